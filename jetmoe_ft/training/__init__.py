"""Stage 4, the run: the one JetMoE trainer layer every loop mixes into its TRL / transformers trainer
(`trainers`: router loss once, `aux_loss`, the non-finite guard), the run around it (`runs`: resume, before/after
evaluation, saving; `provenance`: fingerprint and lock; `model_card`), routing health and drift logged during
training (`routing_health`, `drift`), the reference policy of preference loops (`reference`) and the routing of
GRPO rollouts (`rollout_routing`) and its replay in training forwards (`routing_replay`).

Imports: `modeling`, `data`, `adapters`, `loading` and the shared modules; never a loop or `evaluation`."""
