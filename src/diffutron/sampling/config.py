"""Sampling settings: the typed config, its validation, and the one mapping from a user's settings
(the CLI's options, the server's request fields) to a config, with the user-facing defaults.

`SamplingConfig()` is the plain algorithm (greedy, no penalty). `user_config(...)` is what people get
from `diffutron generate` and the server: the defaults chosen by measurement (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from diffutron.errors import UsageError

# Torch-free on purpose: the CLI reads defaults and names from here for its --help.
POLICIES = ("confidence", "margin", "entropy", "random", "threshold", "factor", "ancestral")
FRAMES = ("closed", "open")
CACHES = ("none", "prefix", "dual")
MAX_SEED = 2**63 - 1  # seeds are int64 (rng.py)
MAX_NEW_TOKENS = 64  # tokens generated when a caller does not say (generate(), the CLI, the server)
# A temperature this small would overflow logits / T: it means greedy.
GREEDY_BELOW = 1e-4


@dataclass
class SamplingConfig:
    steps: int | None = None  # default: one token per step (max_new_tokens, or the number of masks)
    block_length: int | None = None  # default: the whole generated region as one block
    policy: str = "confidence"
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW): greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; CTRL's, on the prompt's and the generated tokens
    threshold: float = 0.9  # tau of the threshold policy
    factor: float = 1.0  # f of the factor policy: reveal the n surest with (n + 1)(1 - c_n) < f
    cfg_scale: float = 0.0  # classifier-free guidance (LLaDA): 0 is off; the prompt masked is the unconditional
    schedule: str = "linear"  # how many tokens each step reveals
    stop: tuple[str, ...] = ()  # stop strings, matched on the settled text; the text ends before them
    stop_at_eos: bool = True  # end the text at the first end-of-sequence token
    ban_eos: bool = False  # never propose the end-of-sequence token: always max_new_tokens
    # generation canvas: "open" = [CLS] prompt masks, LLaDA's and dllm's canvas (ends with the masks);
    # "closed" = [CLS] prompt masks [SEP]. Open by measurement: on the shipped model the closed frame's
    # [SEP] pulls a "." into the last position of every text, and at equal diversity its text is
    # 1.7x less likely under a trigram model of the corpus (docs/benchmarks.md, canvas frames)
    frame: str = "open"
    # approximate key/value caching of the encoder (sampling/cache.py): "none" is the exact sampler
    cache: str = "none"
    refresh_every: int | None = None  # steps between full refreshes of the cache (and at every block start)
    seed: int = 0  # row i of a call uses seed + i; see rng.py
    truncate_prompt: bool = False  # left-truncate a prompt that does not fit, instead of refusing it
    history: bool = False  # keep every step's canvas in the result

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        """Every setting checked for type sense and range; a UsageError names the one that is wrong."""
        for name in ("temperature", "top_p", "repetition_penalty", "threshold", "factor", "cfg_scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise UsageError(f"{name.replace('_', '-')} must be a finite number, got {value!r}")
        if self.policy not in POLICIES:
            raise UsageError(f"unknown policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        from diffutron.schedules import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.frame not in FRAMES:
            raise UsageError(f"unknown frame {self.frame!r}: choose one of {', '.join(FRAMES)}")
        if self.cache not in CACHES:
            raise UsageError(f"unknown cache {self.cache!r}: choose one of {', '.join(CACHES)}")
        for name in ("steps", "block_length", "refresh_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        checks = [
            (self.temperature >= 0, "temperature", "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "top-p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "top-k must be a whole number >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty", "repetition-penalty must be > 0"),
            (0 < self.threshold <= 1, "threshold", "threshold must be in (0, 1]"),
            (self.factor > 0, "factor", "factor must be > 0"),
            (self.cfg_scale >= 0, "cfg_scale", "cfg (the guidance scale) must be >= 0"),
            (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED, "seed", f"seed must be in [0, {MAX_SEED}]"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise UsageError(f"{message}, got {getattr(self, name)!r}")
        if isinstance(self.stop, str):
            raise UsageError("stop must be a list of strings, not one string")

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one denoising batch; seed, stop, EOS handling, frame, steps and
        block length are per row."""
        return (
            self.policy,
            0.0 if self.greedy else self.temperature,
            self.top_k,
            self.top_p,
            self.repetition_penalty,
            self.threshold,
            self.factor,
            self.cfg_scale,
            self.schedule,
            self.cache,
            self.refresh_every,
        )


# What a person gets from `diffutron generate` and the server where they leave a setting out.
# Repetition penalty 1.2: on the shipped model greedy decoding with it repeats a token half as often,
# with more distinct bigrams and lower trigram perplexity (docs/benchmarks.md, sampling policies).
USER_DEFAULTS = {"generate": {"repetition_penalty": 1.2}, "infill": {}}
# MDLM's ancestral sampler draws from the model's distribution itself: the policy implies these.
ANCESTRAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


def user_config(mode: str, **settings) -> SamplingConfig:
    """A validated config from user settings (None = the default for `mode`, "generate" or "infill").

    `policy="ancestral"` implies temperature 1 and no top-k / top-p / penalty (MDLM's sampler); a
    conflicting explicit value is refused rather than silently giving a different sampler.
    """
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown sampling setting(s): {', '.join(unknown)}")
    given = {k: v for k, v in settings.items() if v is not None}
    defaults = dict(USER_DEFAULTS[mode])
    if given.get("policy") == "ancestral":
        conflicts = [k for k, v in ANCESTRAL.items() if k in given and given[k] != v]
        if conflicts:
            raise UsageError(
                f"the ancestral policy is MDLM's sampler: it draws at temperature 1 without top-k, top-p or "
                f"repetition penalty; drop {', '.join(conflicts)} (or use --policy random)"
            )
        defaults.update(ANCESTRAL)
    if "stop" in given:
        given["stop"] = (given["stop"],) if isinstance(given["stop"], str) else tuple(given["stop"])
    config = SamplingConfig(**{**defaults, **given})
    config.validate()
    return config
