"""Stage 5, verified export (`jetmoe-ft export`): a run directory -> a plain transformers checkpoint that the tools
serving JetMoE (transformers itself: `transformers serve`) load, checked before anything is published: the fine-tune
is there (check 1), every merged tensor is base + scale · B_e · A_e and every other tensor is the base's (check 2),
transformers alone reproduces the run's logits, greedy tokens and routing in a process that cannot import jetmoe_ft
(check 3), and stock PEFT does the same with the adapter in its own format (check 4).

`sources` (what a run holds), `merge` (the transformers checkpoint), `peft_format` (the stock adapter), `checks` and
`fresh_check` (checks 1-4), `card`, `publish`, `pipeline.export_run`, `command` (the command line).

Imports: `modeling`, `adapters`, `loading`, `training.model_card` (the loop names) and the shared modules; never a
loop or `evaluation`. `fresh_check.py` imports nothing of jetmoe_ft at all.
"""
