"""Stage 5, what a trained model does: `eval-cls` (`eval_cls`), `eval-gen` and its report (`eval_gen`,
`eval_gen_report`), generation (`generation`, `chat`), checkable rewards and reward functions (`rewards`,
`reward_funcs`), scores with intervals (`metrics`), plots, the lm-evaluation-harness model (`lm_eval_model`) and
what preference loops report (`preference_report`).

Imports: every lower stage (`modeling`, `data`, `adapters`, `loading`, `training`); never a loop."""
