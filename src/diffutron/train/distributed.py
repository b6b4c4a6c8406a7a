"""What training on several processes needs, and nothing else: accelerate set up as its config asks (DDP,
FSDP2, DeepSpeed), a run folder every process sees, and the weights and parameters as they live after
`accelerator.prepare`.

FSDP and DeepSpeed on a CPU. accelerate (1.16) sets its state up for FSDP or DeepSpeed only on an
accelerator: on a CPU process group (gloo) its state says MULTI_CPU and the model is wrapped in DDP
whatever the config file asks. diffutron builds accelerate's state for the CPU process group, then gives
it the distributed type and plugin the config asks for, as `AcceleratorState` does for a GPU (the one
step accelerate leaves out); every step after that (wrapping with `fully_shard`, sharded checkpoints,
gathered state dicts, clipping of sharded gradients) is accelerate's and torch's own code. Whatever the
device, a config that asks for FSDP or DeepSpeed and does not get it stops the run with one line.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta
from pathlib import Path

import torch

from diffutron.config import TrainSection
from diffutron.errors import DiffutronError, UsageError

FSDP, DEEPSPEED = "FSDP", "DEEPSPEED"


def requested_type() -> str | None:
    """The sharded training the launch asks for (`accelerate launch` sets these from its config file)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return DEEPSPEED
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FSDP
    return None


def make_accelerator(precision: str, settings: TrainSection):
    """The run's Accelerator: DDP, FSDP or DeepSpeed as the launch asks, on GPUs or a CPU process group.

    The scheduler steps once per optimizer step, by the loop: accelerate's own stepping would step it
    once per process (it assumes a schedule sized in per-process batches).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    wanted = requested_type()
    group = InitProcessGroupKwargs(timeout=timedelta(minutes=settings.timeout_minutes))
    if cpu and wanted is not None:
        _sharded_state_on_cpu(wanted, precision, group.to_kwargs())
    accelerator = Accelerator(
        cpu=cpu,
        kwargs_handlers=[group],
        gradient_accumulation_steps=settings.grad_accum,
        mixed_precision=precision,
        log_with=settings.trackers or None,
        project_dir=settings.out,
        step_scheduler_with_optimizer=False,
    )
    got = accelerator.distributed_type.name
    if wanted is not None and got != wanted:
        raise DiffutronError(
            f"the accelerate config asks for {wanted} but accelerate set up {got}: launch with "
            "`accelerate launch --config_file configs/accelerate/...` (torchrun), not a plain `diffutron train`"
        )
    if got == DEEPSPEED:
        _fill_deepspeed_config(accelerator.state.deepspeed_plugin, settings)
    if accelerator.gradient_accumulation_steps != settings.grad_accum:  # the launch's variables win in accelerate
        raise UsageError(
            f"the accelerate launch sets {accelerator.gradient_accumulation_steps} gradient accumulation steps, the "
            f"recipe {settings.grad_accum} (train.grad_accum): leave them out of the launch (the recipe sets them)"
        )
    return accelerator


def _fill_deepspeed_config(plugin, settings: TrainSection) -> None:
    """DeepSpeed's micro-batch, accumulation and clipping from the recipe (DeepSpeed clips for itself, and
    accelerate would take its config's accumulation over the recipe's); a config that sets them otherwise
    is refused rather than silently obeyed."""
    from_recipe = {
        "train_micro_batch_size_per_gpu": ("train.batch_size", settings.batch_size),
        "gradient_accumulation_steps": ("train.grad_accum", settings.grad_accum),
        "gradient_clipping": ("train.max_grad_norm", settings.max_grad_norm),
    }
    config = plugin.deepspeed_config
    for key, (name, value) in from_recipe.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise UsageError(
                f"the DeepSpeed config sets {key} {config[key]}, the recipe {name} {value}: "
                "leave it out of the DeepSpeed config (the recipe sets it)"
            )


def _sharded_state_on_cpu(wanted: str, precision: str, group: dict) -> None:
    """accelerate's state for a CPU process group, with the distributed type and plugin the launch asks for."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    partial = PartialState(cpu=True, **group)  # joins the gloo process group of `accelerate launch`
    if partial.distributed_type != DistributedType.MULTI_CPU:
        return  # no process group (a plain `diffutron train`): make_accelerator says what is wrong
    state = AcceleratorState(
        mixed_precision=precision, cpu=True, dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True
    )
    if wanted == FSDP:
        plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables of the launch
        if precision != "no":
            plugin.set_mixed_precision(precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
    else:
        plugin = DeepSpeedPlugin()  # read from the ACCELERATE_DEEPSPEED_* variables of the launch
        plugin.set_mixed_precision(precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state._mixed_precision = "no"  # DeepSpeed casts for itself, as accelerate arranges on a GPU
        state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = state.distributed_type


def check_shared_folder(accelerator, out: Path) -> None:
    """Every process must see the run folder the main process writes (checkpoints are written by all of
    them, renamed by one): on several machines, a filesystem they share. One line names who does not."""
    from accelerate.utils import broadcast_object_list, gather_object

    if accelerator.num_processes == 1:
        return
    probe = out / ".shared-check"
    token = [secrets.token_hex(8)]
    if accelerator.is_main_process:
        probe.write_text(token[0], encoding="utf-8")
    broadcast_object_list(token)
    try:
        seen = probe.read_text(encoding="utf-8") == token[0]
    except OSError:
        seen = False
    views = gather_object([(seen, accelerator.process_index, socket.gethostname(), str(out))])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [(rank, host, path) for ok, rank, host, path in views if not ok]
    if blind:
        rank, host, path = blind[0]
        raise DiffutronError(
            f"process {rank} on {host} does not see the run folder {out} that process 0 writes (it looks in "
            f"{path}): training on several machines needs --out on a filesystem they all share"
        )


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The trainable parameters of the prepared model: FSDP replaces them, so a list taken before
    `accelerator.prepare` holds dead tensors (clipping over it would clip nothing)."""
    return [p for p in model.parameters() if p.requires_grad]


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == FSDP


def weights_held(model) -> float:
    """The share of the model's weights this process holds: 1 for replicas (DDP), about 1 / processes
    when FSDP shards them."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in model.parameters():
        total += p.numel()
        held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return held / total


def full_model_state(accelerator, model, lm) -> dict | None:
    """Under FSDP, the model's full weights for `lm.save_pretrained` (a collective: every process calls it;
    the main process gets them); otherwise None: the live weights are whole in every process."""
    if not is_sharded(accelerator):
        return None
    full = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    # a tied weight (the decoder's, the embeddings') comes back once per name, as copies: keep its first
    # name, as save_pretrained does for the live model; keys of the DiffusionLM (model.<...>) -> of the model inside
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    aliases = {name for group in names.values() for name in group[1:]}
    return {key.removeprefix("model."): value for key, value in full.items() if key not in aliases}


def replicas_in_sync(accelerator, model) -> bool | None:
    """Every process holds the same trainable weights (a checksum per process, gathered); None under FSDP,
    where each process holds its own shard and there are no replicas to compare."""
    if is_sharded(accelerator):
        return None
    with torch.no_grad():
        params = trainable_parameters(model)
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum()[None].to(accelerator.device)
    sums = accelerator.gather(checksum)
    return bool((sums == sums[0]).all())


def launch_shape(accelerator) -> dict:
    """What a checkpoint depends on: the sharding (FSDP, DeepSpeed or none) and the number of processes."""
    kind = accelerator.distributed_type.name
    return {"sharding": kind if kind in (FSDP, DEEPSPEED) else None, "processes": accelerator.num_processes}


def evaluation_shard(accelerator):
    """This process's share of an evaluation (evaluate.Shard), or None for one process."""
    from diffutron.evaluate import Shard

    if accelerator.num_processes == 1:
        return None
    device = accelerator.device

    def reduce(vector: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(vector.to(device), "sum").cpu()

    return Shard(accelerator.process_index, accelerator.num_processes, reduce, lockstep=is_sharded(accelerator))


def on_main_process(accelerator, action) -> None:
    """Run `action` on the main process; a DiffutronError there is raised on every process."""
    from accelerate.utils import broadcast_object_list

    message = [None]
    if accelerator.is_main_process:
        try:
            action()
        except DiffutronError as err:
            message = [(type(err), str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if message[0] is not None:
        kind, text = message[0]
        raise kind(text)
