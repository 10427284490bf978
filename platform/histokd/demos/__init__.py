"""The demo layer: synthetic H&E slides with exact truth (`synthetic`), the downstream demo tasks
cut from them (`tasks`) and the resolution-distillation demo (`resdist`).

Jobs import it only when they run their demo (no ``--slides`` or ``--data`` given); the runtime
path of a real cohort never does (a test checks).
"""
