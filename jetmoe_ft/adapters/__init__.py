"""Stage 3, what a run trains: expert-aware LoRA on the MoA / MoE expert tensors (`lora`), experts chosen from
the recipe's data (`selection`), frozen routers and restricted expert updates (`freezing`), 4-bit experts
(`quantization`), and `adapt.adapt_model`, the one call every loop makes.

Imports: `modeling`, `data`, the shared modules (`config`, `compat`, `distributed`) and PEFT; no training code."""
