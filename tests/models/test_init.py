"""Every job's ``--init`` (histokd/models/timm_weights.py, loaded by the factory): ImageNet
weights from an offline Hugging Face cache through the real Hub client, weights files of every
kind, and the errors: offline, CSAT, a file of another backbone."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from histokd.models import backbone_state_dict, create_backbone, save_backbone
from histokd.models.timm_weights import check_init, parse_init

#: The timm ImageNet checkpoint each backbone takes (timm's default pretrained tag of the model;
#: resnet18_sat shares resnet18's layers).
IMAGENET_HUB_IDS = {
    "resnet18": "timm/resnet18.a1_in1k",
    "resnet18_sat": "timm/resnet18.a1_in1k",
    "efficientnet_b0": "timm/efficientnet_b0.ra_in1k",
    "convnextv2_atto": "timm/convnextv2_atto.fcmae_ft_in1k",
}
_ARCH = {"resnet18_sat": "resnet18"}


@pytest.mark.parametrize("name", list(IMAGENET_HUB_IDS))
def test_imagenet_loads_the_hub_checkpoint_that_timm_loads(hub_cache, name):
    arch = _ARCH.get(name, name)
    assert timm.models.get_pretrained_cfg(arch).hf_hub_id == IMAGENET_HUB_IDS[name]
    hub, _ = hub_cache(arch, seed=11)
    source = parse_init("imagenet", name)
    assert (source.kind, source.hub_id) == ("imagenet", IMAGENET_HUB_IDS[name])
    torch.manual_seed(0)
    loaded = backbone_state_dict(create_backbone(name, init="imagenet"))
    torch.manual_seed(0)
    random = backbone_state_dict(create_backbone(name))  # the same seed, no weights
    # timm's own loader, offline, on the same cache: the same tensors
    timm_loaded = timm.create_model(arch, pretrained=True).state_dict()
    shared = [k for k in loaded if k in hub]
    assert all(
        torch.equal(loaded[k], hub[k]) and torch.equal(hub[k], timm_loaded[k]) for k in shared
    )
    floats = [k for k in shared if loaded[k].is_floating_point()]
    assert len(floats) > 0.8 * len(shared)
    assert all(not torch.equal(loaded[k], random[k]) for k in floats)  # every one from the file
    own = [k for k in loaded if k not in hub]  # resnet18_sat's SAT modules keep their init
    assert len(own) == (104 if name == "resnet18_sat" else 0) and all(".se." in k for k in own)
    assert all(torch.equal(loaded[k], random[k]) for k in own)


def test_imagenet_offline_with_an_empty_cache_is_one_line(hub_cache):
    hub_cache("efficientnet_b0")  # another model's weights are there, not resnet18's
    with pytest.raises(ValueError) as error:
        check_init("imagenet", "resnet18")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "init='imagenet': the ImageNet weights of resnet18 (timm/resnet18.a1_in1k on the Hugging "
        "Face Hub) are not in the cache "
    )
    assert "(HF_HUB_OFFLINE=1)" in message
    assert "`hf download timm/resnet18.a1_in1k`" in message
    assert "timm.create_model('hf-hub:timm/resnet18.a1_in1k', pretrained=True)" in message
    assert "~/.cache/huggingface" in message and message.endswith("--init FILE")
    with pytest.raises(ValueError, match="ImageNet weights of resnet18 .* not in the cache"):
        create_backbone("resnet18", init="imagenet")  # a worker on a node without the weights


def test_imagenet_without_network_fails_at_once(hub_cache, monkeypatch):
    import time

    import huggingface_hub.constants

    hub_cache("efficientnet_b0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    with pytest.raises(
        ValueError, match=r"cannot be reached \(no network: hub.invalid does not resolve\)"
    ):
        check_init("imagenet", "resnet18")
    assert time.monotonic() - started < 5  # not the Hub client's 23 s of retries
    # cached weights need no network at all
    assert check_init("imagenet", "efficientnet_b0") == "imagenet"


@pytest.mark.parametrize("name", ["csat", "csat_nosat"])
def test_csat_has_no_imagenet_weights(name):
    with pytest.raises(
        ValueError,
        match=rf"init='imagenet': CSAT has no ImageNet weights \(backbone='{name}'\); it stays "
        "random unless a file is given: --init random or --init FILE",
    ):
        check_init("imagenet", name)


def test_weights_files_of_every_kind_load(hub_cache, tmp_path):
    hub, hub_file = hub_cache("resnet18", seed=5)
    torch.manual_seed(6)
    own = create_backbone("resnet18")
    files = {
        "histokd backbone file": (save_backbone(own, tmp_path / "backbone.pth"), own),
        "timm checkpoint with its head, as timm's train.py writes it": (
            tmp_path / "checkpoint.pth.tar", hub),
        "safetensors with its head": (tmp_path / "weights.safetensors", hub),
        "the Hub file as downloaded": (hub_file, hub),
    }  # fmt: skip
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in hub.items()}},
               files["timm checkpoint with its head, as timm's train.py writes it"][0])  # fmt: skip
    save_file({k: v.contiguous() for k, v in hub.items()}, str(tmp_path / "weights.safetensors"))
    for what, (path, weights) in files.items():
        expected = backbone_state_dict(weights) if isinstance(weights, torch.nn.Module) else weights
        for init in (str(path), f"timm:{path}"):
            assert check_init(init, "resnet18") == (init if init.startswith("timm:") else str(path))
            torch.manual_seed(0)
            loaded = backbone_state_dict(create_backbone("resnet18", init=init))
            assert len(loaded) == 120, what
            assert all(torch.equal(v, expected[k]) for k, v in loaded.items()), what
    # any timm Hub model: hf-hub:ORG/NAME (here, from the same offline cache)
    assert check_init("hf-hub:timm/resnet18.a1_in1k", "resnet18") == "hf-hub:timm/resnet18.a1_in1k"
    loaded = backbone_state_dict(create_backbone("resnet18", init="hf-hub:timm/resnet18.a1_in1k"))
    assert all(torch.equal(v, hub[k]) for k, v in loaded.items())


def test_a_file_of_another_backbone_names_its_keys_and_the_file(hub_cache, tmp_path):
    _, hub_file = hub_cache("resnet18")
    with pytest.raises(ValueError) as error:
        create_backbone("efficientnet_b0", init=str(hub_file))
    message = str(error.value)
    assert message.startswith(
        f"{hub_file}: 347 of 352 backbone keys are missing ('conv_stem.weight', "
    )
    unexpected = re.search(
        r"the file has keys like (.*) and 114 more that the efficientnet_b0 backbone lacks", message
    )
    named = re.findall(r"'([\w.]+)'", unexpected[1])
    assert len(named) == 3 and all(k.startswith(("layer", "fc.")) for k in named)
    # one tensor short: the key named, not left at its random initialisation as timm would
    state = {
        k: v
        for k, v in timm.create_model("resnet18").state_dict().items()
        if k != "layer2.0.bn1.running_var"
    }
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(
        ValueError,
        match=r"short\.pth: 1 of 120 backbone keys are missing \('layer2\.0\.bn1\.running_var'\); the file has keys like 'fc.weight', 'fc.bias' that",
    ):
        create_backbone("resnet18", init=str(tmp_path / "short.pth"))
    # a Hub checkpoint of another architecture is refused before its weights are read
    with pytest.raises(
        ValueError,
        match=r"timm/resnet18.a1_in1k holds resnet18 weights; backbone='efficientnet_b0' needs efficientnet_b0's",
    ):
        check_init("hf-hub:timm/resnet18.a1_in1k", "efficientnet_b0")
    (tmp_path / "notes.pth").write_text("not weights\n")
    with pytest.raises(
        ValueError, match=r"init='.*notes\.pth': .*notes\.pth is not a weights file"
    ):
        create_backbone("resnet18", init=str(tmp_path / "notes.pth"))
    with pytest.raises(
        ValueError,
        match=r"init='/no/such\.pth': no such file '/no/such\.pth'; allowed: random, imagenet",
    ):
        check_init("/no/such.pth", "resnet18")
    with pytest.raises(ValueError, match=r"expected hf-hub:ORG/NAME\[@REVISION\]"):
        check_init("hf-hub:resnet18", "resnet18")
