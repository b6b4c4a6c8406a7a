"""A run's state on disk: checkpoints written atomically through run_folder, the resume point, the final model.

A checkpoint is accelerate's state (model, optimizer, scheduler, every process's RNG) + `model/` (an HF
folder or peft adapter that plain transformers / peft load) + trainer_state.json, written last: the
marker that the folder is complete. It is written to `.tmp-checkpoint-<step>` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from diffutron.atomic import write_json
from diffutron.config import TrainRecipe, resume_conflicts, to_dict
from diffutron.errors import UsageError
from diffutron.run_folder import COMPLETE_MARKER, RECIPE_FILE, checkpoints, prune, publish, read_state


def fault_point(site: str, step: int) -> None:
    """Fault injection for tests: DIFFUTRON_TEST_KILL=<site>:<step> kills the process (SIGKILL) here;
    <site>:<step>@<rank> only the process of that rank (RANK, as torchrun sets it)."""
    wanted = os.environ.get("DIFFUTRON_TEST_KILL", "")
    point, _, rank = wanted.partition("@")
    if point == f"{site}:{step}" and rank in ("", os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def save_model(lm, folder: Path, card: str | None, state_dict: dict | None = None) -> None:
    """The model as an HF folder (or peft adapter); `state_dict`: its full weights where the live ones are
    sharded across processes (FSDP), gathered by the caller."""
    lm.save_pretrained(folder, state_dict=state_dict)
    if card is not None:  # replaces peft's empty template
        (folder / "README.md").write_text(card, encoding="utf-8")


def save_only_what_trains(accelerator, lora: bool) -> tuple[dict, dict]:
    """With LoRA, checkpoints hold the trained weights (adapters), the optimizer, scheduler, RNG and data
    position, not the frozen base: that is written once (the model the recipe names, or base/) and rebuilt
    before a resume loads the rest. Returns the keyword arguments of accelerate's save_state and load_state.
    Under FSDP accelerate writes its full sharded state (its FSDP saving has no such option)."""
    from diffutron.train.distributed import DEEPSPEED, is_sharded

    if not lora or is_sharded(accelerator):
        return {}, {}
    if accelerator.distributed_type.name == DEEPSPEED:
        return {"exclude_frozen_parameters": True}, {"load_module_strict": False}

    def keep_trained(models, weights, _folder) -> None:
        for model, weight in zip(models, weights, strict=True):
            trained = {name for name, param in model.named_parameters() if param.requires_grad}
            for key in [key for key in weight if key not in trained]:
                del weight[key]

    accelerator.register_save_state_pre_hook(keep_trained)
    return {}, {"strict": False}


def save_checkpoint(
    accelerator, model, lm, out: Path, state: dict, keep_last: int, card: str, save_options: dict
) -> Path:
    """Write checkpoint-<step> atomically; every process takes part (accelerate's state is per process)."""
    from diffutron.train.distributed import full_model_state

    final = out / f"checkpoint-{state['step']}"
    tmp = out / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **save_options)
    weights = full_model_state(accelerator, model, lm)  # a collective under FSDP: every process calls it
    accelerator.wait_for_everyone()  # every process's RNG state is in before the folder is marked complete
    if accelerator.is_main_process:
        save_model(lm, tmp / "model", card, weights)
        fault_point("checkpoint-written", state["step"])
        write_json(tmp / COMPLETE_MARKER, state)
        publish(tmp, final, between=lambda: fault_point("checkpoint-swap", state["step"]))
        prune(out, keep_last)
        fault_point("checkpoint-saved", state["step"])
    accelerator.wait_for_everyone()
    return final


def save_final(accelerator, model, lm, out: Path, state: dict, card: str) -> Path:
    """Write final/ (the model and the state it was trained to) atomically."""
    from diffutron.train.distributed import full_model_state

    weights = full_model_state(accelerator, model, lm)
    final, tmp = out / "final", out / ".tmp-final"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(lm, tmp, card, weights)
        write_json(tmp / COMPLETE_MARKER, state)
        publish(tmp, final, between=lambda: fault_point("final-swap", state["step"]))
    accelerator.wait_for_everyone()
    return final


def resume_point(recipe: TrainRecipe, out: Path) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint and its state, after checking that the run's recipe matches."""
    found = checkpoints(out)
    if not found:
        return None, None
    saved = out / RECIPE_FILE
    if saved.is_file():
        conflicts = resume_conflicts(json.loads(saved.read_text(encoding="utf-8")), to_dict(recipe))
        if conflicts:
            raise UsageError(
                f"{out} holds a run with other settings ({', '.join(conflicts)}): resume it with its own "
                f"settings (see {saved}), or train into another --out"
            )
    return found[-1], read_state(found[-1])


def check_launch(resumed: dict, accelerator, checkpoint: Path) -> None:
    """A checkpoint resumes under the launch that wrote it: accelerate's state (sharded or not, one RNG file
    per process) and the position in the data (batches per process) depend on it."""
    from diffutron.train.distributed import launch_shape

    now = launch_shape(accelerator)
    then = {key: resumed.get(key, now[key]) for key in now}  # checkpoints of older versions do not say
    if then != now:

        def shape(s: dict) -> str:
            return f"{s['sharding'] or 'no sharding'} on {s['processes']} process{'es' * (s['processes'] > 1)}"

        raise UsageError(
            f"{checkpoint} was written by {shape(then)}, this launch is {shape(now)}: resume with the launch that "
            f"wrote it, or start a new run from its weights (--model {checkpoint / 'model'})"
        )
