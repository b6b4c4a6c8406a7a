"""diffutron as an lm-evaluation-harness model, registered as `diffutron` (needs `pip install 'diffutron[eval]'`).

    import diffutron.harness, lm_eval
    lm_eval.simple_evaluate(model="diffutron", model_args="pretrained=tiny-diffutron,mc_num=32", tasks=[...])
    python -m diffutron.harness --model diffutron --model_args pretrained=PATH --tasks xcopa_tr   # lm-eval's CLI

- loglikelihood: the masked-diffusion ELBO of the continuation, only the continuation masked
  (likelihood.py), every request and Monte Carlo sample batched together.
- loglikelihood_rolling: the ELBO bound of each document, cut into windows of the model's context.
- generate_until: diffutron's sampler, the task's stop strings cut on the text, max_gen_toks.

The continuation's tokens are those of the continuation *in context* (likelihood.encode_pair), never
the tokenizer's end token.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable

from diffutron.errors import DiffutronError, UsageError
from diffutron.likelihood import encode_pair

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the optional extra
    raise DiffutronError("the lm-evaluation-harness is not installed: pip install 'diffutron[eval]'") from err


def _sampling_fields() -> set[str]:
    from diffutron.sampling import SamplingConfig

    return {f.name for f in dataclasses.fields(SamplingConfig)} - {"stop", "stop_at_eos", "history", "seed"}


@register_model("diffutron")
class HarnessModel(LM):
    """Model args: pretrained (folder, adapter folder, hub id, preset:NAME, or a shipped model's name;
    default tiny-diffutron), device, dtype (float32, bfloat16, ...), batch_size (rows per forward),
    mc_num (Monte Carlo samples per continuation), seed, check_greedy, max_gen_toks, and the sampler's
    settings for generate_until (steps, block_length, policy, temperature, top_k, top_p,
    repetition_penalty, threshold, cfg_scale, schedule, truncate_prompt)."""

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 32,
        max_batch_size: int | None = None,
        mc_num: int = 128,
        seed: int = 0,
        check_greedy: bool = False,
        max_gen_toks: int = 256,
        trust_remote_code: bool = False,
        lm=None,
        **sampling,
    ) -> None:
        super().__init__()
        unknown = set(sampling) - _sampling_fields()
        if unknown:
            raise UsageError(
                f"unknown model argument(s) for diffutron: {', '.join(sorted(unknown))} "
                f"(known: pretrained, device, dtype, batch_size, mc_num, seed, check_greedy, max_gen_toks, "
                f"{', '.join(sorted(_sampling_fields()))})"
            )
        if lm is None:
            import torch

            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes cuda:0 unless told otherwise; its own HF model falls back too
                warnings.warn(f"device {device} asked for, but CUDA is not available: using the CPU", stacklevel=2)
                device = None
            lm = load(pretrained, device, dtype, trust_remote_code)
        self.lm = lm
        self.batch_size = 32 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.mc_num, self.seed = int(mc_num), int(seed)
        self.check_greedy = str(check_greedy).lower() in ("true", "1", "yes")
        self.max_gen_toks = int(max_gen_toks)
        self.sampling = sampling
        from diffutron.sampling import SamplingConfig

        SamplingConfig(**sampling).validate()  # a bad setting fails now, not after the likelihood tasks ran
        if self.batch_size < 1 or self.mc_num < 1 or self.max_gen_toks < 1:
            raise UsageError("batch_size, mc_num and max_gen_toks must be at least 1")
        self._device = lm.device

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_name": self.lm.name, "mc_num": self.mc_num, "seed": self.seed}

    # -- loglikelihood ------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.lm.tokenizer, *request.args) for request in requests]
        scores = self._score(pairs, "loglikelihood", disable_tqdm, check_greedy=self.check_greedy)
        results = [(s.logprob, s.greedy) for s in scores]
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix, suffix = self.lm.special_affixes
        room = self.lm.context_length - len(prefix) - len(suffix)
        windows, owners = [], []
        for i, request in enumerate(requests):
            ids = self.lm.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), room):
                windows.append(([], ids[start : start + room]))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self._score(windows, "loglikelihood_rolling", disable_tqdm), strict=True):
            totals[owner] += score.logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _score(self, pairs, what: str, disable_tqdm: bool, check_greedy: bool = False):
        from tqdm import tqdm

        from diffutron.likelihood import continuation_logprobs

        with tqdm(desc=f"diffutron {what} (rows)", disable=disable_tqdm) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            return continuation_logprobs(
                self.lm,
                pairs,
                mc_num=self.mc_num,
                seed=self.seed,
                batch_size=self.batch_size,
                check_greedy=check_greedy,
                progress=progress,
            )

    # -- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs
        from tqdm import tqdm

        from diffutron.sampling import SamplingConfig, generate

        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = tuple(s for s in kwargs.get("until") or [] if s)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else None
            groups.setdefault((until, int(kwargs["max_gen_toks"]), temperature), []).append(i)
        out = [""] * len(requests)
        prefix, suffix = self.lm.special_affixes
        longest = self.lm.context_length - len(prefix) - len(suffix) - 1  # at least one prompt token
        with tqdm(total=len(requests), desc="diffutron generate_until", disable=disable_tqdm) as bar:
            for number, ((until, max_gen_toks, temperature), members) in enumerate(groups.items()):
                options = {"truncate_prompt": True, **self.sampling}
                if temperature is not None:
                    options["temperature"] = temperature
                new_tokens = min(max_gen_toks, longest)
                block = int(options.get("block_length") or 0)
                if block:  # the sampler needs whole blocks: generate up to the next multiple, keep max_gen_toks
                    new_tokens = min(-(-new_tokens // block) * block, longest // block * block)
                config = SamplingConfig(**options, stop=until, seed=self.seed + number)
                for b in range(0, len(members), self.batch_size):
                    chunk = members[b : b + self.batch_size]
                    result = generate(self.lm, [requests[i].args[0] for i in chunk], new_tokens, config)
                    for i, text, ids in zip(chunk, result.texts, result.token_ids, strict=True):
                        if len(ids) > max_gen_toks:
                            text = self.lm.tokenizer.decode(ids[:max_gen_toks], skip_special_tokens=True)
                        out[i] = cut_at_stops(text, until)
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                    bar.update(len(chunk))
        return out


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """The text before the first occurrence of any stop string."""
    end = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:end]


def load(name: str | None, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False):
    """A DiffusionLM from any name diffutron loads (default: the shipped tiny-diffutron)."""
    import torch

    from diffutron.model import DiffusionLM

    torch_dtype = getattr(torch, dtype, None) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise UsageError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return DiffusionLM.from_pretrained(
        name or "tiny-diffutron", device=device, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )


if __name__ == "__main__":  # lm-eval's own command line, with `diffutron` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
