"""Training on accelerate: CPT under the MDLM objective, fixed-ratio MLM, or SFT; LoRA or full.

The same code runs on a CPU, one GPU, or many (`accelerate launch` with DDP, FSDP2 or DeepSpeed ZeRO-2
through the config files in configs/accelerate/), on one machine or several. A run folder
(run_folder.py) holds

    recipe.json            the resolved recipe; a resume with other settings is refused
    metrics.jsonl          one JSON object per logged step and per evaluation, each step once
    checkpoint-<step>/     accelerate state (model, optimizer, scheduler, RNG; sharded under FSDP) + model/
                           (HF folder or peft adapter) + trainer_state.json; written to a temporary folder
                           and renamed
    final/                 the model at the end, as an HF folder or adapter, with its model card
    base/                  for LoRA on a base that exists nowhere else (a preset's random weights, an
                           adapter folder merged into its base): that base, which the adapters name
    curves.png             loss and held-out PPL curves

build.py: the model and data of a recipe;  loop.py: the loop;  state.py: checkpoints and resume;
distributed.py: what several processes need.
"""

from diffutron.config import TrainRecipe
from diffutron.train.build import build_model, load_training_data
from diffutron.train.loop import compute_loss, train

__all__ = ["TrainRecipe", "build_model", "compute_loss", "load_training_data", "train"]
