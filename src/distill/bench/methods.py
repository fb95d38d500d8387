"""Which registered objectives the vision benchmark runs, and how each is combined with cross-entropy.

Feature and relation objectives (FitNets, AT, SP, PKT, RKD, FSP, CRD) run with the settings of
`FEATURE_SETTINGS` (RepDistiller's CIFAR-100 weights), after the logit methods.

The method list is built from the objective registry at run time: every objective that compares classifier
logits (it needs the teacher's logits and at most the labels, no features) is a method. What is known
about each one lives here, in one place:

- `NOT_FOR_CLASSIFIERS`: registered objectives that are not image-classification distillation methods
  (token-level LM methods, regularisers without a teacher), with the reason. An objective may also declare
  itself with `OBJECTIVES.add(..., classification=False)` (or `True`), which wins over this list.
- `PUBLISHED`: the settings of methods with a published CIFAR protocol (or the nearest thing to one), with
  where they come from. Epoch counts in them are on the 240-epoch CIFAR schedule and are scaled to a
  suite's epochs.
- Any other logit objective (one registered later, or a divergence from the LM literature) gets the KD
  protocol's weights, 0.1 cross-entropy + 0.9 x the objective with its own default parameters, and the
  table says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.errors import UserError
from distill.objectives import OBJECTIVES
from distill.objectives.features import is_feature_objective
from distill.recipe.schema import MethodSpec, ObjectiveSpec
from distill.registry import nearest

PROTOCOL_EPOCHS = 240  # the CRD / mdistiller CIFAR-100 schedule the published settings refer to
BASELINE = "student"  # the method name of "student alone" in --methods

NOT_FOR_CLASSIFIERS: dict[str, str] = {
    "cross_entropy": "the labels alone: this is the 'student alone' baseline, not a distillation method",
    "adakd": "token-level focusing for LM distillation (needs a token axis)",
    "token_selective_kd": "token-selective LM distillation (per-token weighting)",
    "swing_kd": "per-token privacy temperatures for LM distillation",
    "entropy_regularizer": "a regulariser on the student alone (no teacher)",
    "reverse_kl_pg": "on-policy LM distillation: REINFORCE on the student's own sampled tokens (rollouts)",
    "tsd_indirect": "TSD-KD's token re-ranking, for sequences of an LM's own rollouts",
    "soda": "SODA's preference loss between teacher responses and a student snapshot (sequences)",
}


@dataclass(frozen=True)
class Term:
    objective: str
    weight: float
    params: dict[str, Any] = field(default_factory=dict)
    warmup_epochs: float = 0.0  # on the 240-epoch protocol; scaled to the suite's epochs


@dataclass(frozen=True)
class Setting:
    label: str  # the row name in tables
    terms: tuple[Term, ...]
    source: str  # where the numbers come from
    objective: str = ""  # the registered objective this method exists for ("" for the baseline)
    teacher: dict[str, Any] | None = None  # the method's teacher regime (`methods[].teacher`), if any


KD_SOURCE = "CRD / mdistiller CIFAR-100 protocol: 0.1 CE + 0.9 KD, T = 4"

STUDENT_ALONE = Setting("student alone", (Term("cross_entropy", 1.0),), "cross-entropy with the labels only")

# Keyed by the registered objective each setting distils with. Extra variants of one objective (KD with
# logit standardisation) are keyed "objective+variant".
PUBLISHED: dict[str, Setting] = {
    "hinton_kd": Setting(
        "KD",
        (Term("cross_entropy", 0.1), Term("hinton_kd", 0.9, {"temperature": 4.0})),
        KD_SOURCE + " (mdistiller configs/cifar100/kd.yaml)",
        "hinton_kd",
    ),
    "hinton_kd+ls": Setting(
        "KD + LS",
        (
            Term("cross_entropy", 0.1),
            Term("hinton_kd", 9.0, {"temperature": 2.0, "standardize": True}),
        ),
        "Logit Standardization in KD (Sun et al., CVPR 2024), official CIFAR-100 command: "
        "KD config with --logit-stand --base-temp 2 --kd-weight 9",
        "hinton_kd",
    ),
    "dkd": Setting(
        "DKD",
        (
            Term("cross_entropy", 1.0),
            Term("dkd", 1.0, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, warmup_epochs=20.0),
        ),
        "mdistiller configs/cifar100/dkd (resnet32x4 -> resnet8x4): CE 1, alpha 1, beta 8, T 4, "
        "weight warm-up 20 of 240 epochs",
        "dkd",
    ),
    "dist_kd": Setting(
        "DIST",
        (
            Term("cross_entropy", 1.0),
            Term("dist_kd", 1.0, {"temperature": 4.0, "inter_weight": 2.0, "intra_weight": 2.0}),
        ),
        "DIST paper, CIFAR-100 setting: CE 1 + beta = gamma = 2, tau = 4 (T^2 inside the loss)",
        "dist_kd",
    ),
    "pld": Setting(
        "PLD",
        (Term("pld", 1.0, {"temperature": 1.0}),),
        "PLD paper: one list-wise loss replaces CE + KD (teacher temperature 1)",
        "pld",
    ),
    "sinkhorn_kd": Setting(
        "SinKD",
        (
            Term("cross_entropy", 1.0),
            Term("sinkhorn_kd", 1.0, {"temperature": 2.0, "epsilon": 0.1, "iterations": 20}),
        ),
        "SinKD official code's Sinkhorn settings (T 2, epsilon 0.1, 20 iterations; its tasks are NLP, "
        "no CIFAR protocol), added 1:1 to CE",
        "sinkhorn_kd",
    ),
    "bdkd": Setting(
        "BD-KD",
        (Term("cross_entropy", 0.1), Term("bdkd", 14.4, {"temperature": 4.0, "balance": 3.0})),
        "BD-KD replaces KD's KL: the KD protocol (0.1 CE + 0.9 x T^2 x divergence, T 4), balance 3",
        "bdkd",
    ),
    "tgeo_kd": Setting(
        "TGeo-KD",
        (Term("tgeo_kd", 1.0, {"temperature": 4.0}),),
        "S08: one term holds both CE and KD, fused per sample by the learned ratio; T 4 as the KD protocol "
        "(docs/tgeo.md: the paper's constants could not be read)",
        "tgeo_kd",
    ),
    "taid": Setting(
        "TAID",
        (Term("cross_entropy", 0.1), Term("taid", 0.9, {"temperature": 1.0})),
        "TAID official schedule defaults (t 0.4 -> 1, alpha 5e-4, beta 0.99; an LM method, no CIFAR "
        "protocol) with the KD protocol's weights",
        "taid",
    ),
}


REPDISTILLER = "RepDistiller CIFAR-100 command (CRD paper's code): CE 1 + {b} x {what}, its default layers"

# Feature and relation methods: RepDistiller's `-r 1 -a 0 -b beta` (CE 1, no KD, the feature loss x beta),
# and CRD + KD as the CRD paper's best row (`-a 1`, T 4).
FEATURE_SETTINGS: dict[str, Setting] = {
    "fitnet": Setting(
        "FitNet",
        (Term("cross_entropy", 1.0), Term("fitnet", 100.0)),
        REPDISTILLER.format(b=100, what="hint MSE after a conv regressor (single stage)"),
        "fitnet",
    ),
    "attention_transfer": Setting(
        "AT",
        (Term("cross_entropy", 1.0), Term("attention_transfer", 1000.0)),
        REPDISTILLER.format(b=1000, what="attention-map distance over every stage, p = 2"),
        "attention_transfer",
    ),
    "similarity_preserving": Setting(
        "SP",
        (Term("cross_entropy", 1.0), Term("similarity_preserving", 3000.0)),
        REPDISTILLER.format(b=3000, what="similarity-preserving loss on the last stage"),
        "similarity_preserving",
    ),
    "pkt": Setting(
        "PKT",
        (Term("cross_entropy", 1.0), Term("pkt", 30000.0)),
        REPDISTILLER.format(b=30000, what="PKT on the pooled embedding"),
        "pkt",
    ),
    "rkd": Setting(
        "RKD",
        (Term("cross_entropy", 1.0), Term("rkd", 1.0)),
        REPDISTILLER.format(b=1, what="RKD (distance 25, angle 50) on the pooled embedding"),
        "rkd",
    ),
    "fsp": Setting(
        "FSP",
        (Term("cross_entropy", 1.0), Term("fsp", 50.0, {"distance": "mean_squared", "pool": "avg"})),
        REPDISTILLER.format(
            b=50, what="FSP over consecutive stages (its mean-squared distance, average pooling)"
        )
        + " (without RepDistiller's separate FSP pre-training stage)",
        "fsp",
    ),
    "crd": Setting(
        "CRD",
        (Term("cross_entropy", 1.0), Term("crd", 0.8)),
        REPDISTILLER.format(b=0.8, what="CRD (128-d embeddings, 16,384 negatives or all others, T 0.07)"),
        "crd",
    ),
    "crd+kd": Setting(
        "CRD + KD",
        (Term("cross_entropy", 1.0), Term("hinton_kd", 1.0, {"temperature": 4.0}), Term("crd", 0.8)),
        "CRD paper's CRD+KD row (RepDistiller -r 1 -a 1 -b 0.8, T 4)",
        "crd",
    ),
    "acam_kd": Setting(
        "ACAM-KD",
        (Term("cross_entropy", 1.0), Term("acam_kd", 1.0)),
        "S32 ACAM-KD: CE 1 + 1 x (channel + spatial masked distances + mask diversity), the paper's alpha = "
        "lambda = 1 (its settings are for detection; no classification protocol), 6 masks, last stage",
        "acam_kd",
    ),
    "trg+kd": Setting(
        "TRG + KD",
        (Term("cross_entropy", 0.1), Term("hinton_kd", 0.9, {"temperature": 4.0}), Term("trg", 1.0)),
        "S13 TRG on top of the KD protocol (0.1 CE + 0.9 KD, T 4), last-stage positions as tokens, "
        "16 per image; TRG weight 1 and its defaults are ours (no official code found)",
        "trg",
    ),
}


DML_TERMS = (Term("cross_entropy", 1.0), Term("forward_kl", 1.0))
ONLINE_BDKD = (Term("cross_entropy", 1.0), Term("bdkd", 1.0, {"temperature": 1.0}))

# Teacher regimes (`distill.tasks.regimes`), each with the terms its paper trains the student with. None was
# tuned here: the values are the papers' (or, where a paper has none, the KD protocol's).
REGIME_SETTINGS: dict[str, Setting] = {
    "ensemble+kd": Setting(
        "KD, 3-teacher ensemble",
        PUBLISHED["hinton_kd"].terms,
        "the KD protocol from the mean probability of the recipe's teacher trained with seeds 0, 1, 2",
        "hinton_kd",
        {"kind": "ensemble", "seeds": [0, 1, 2]},
    ),
    "dml": Setting(
        "DML (online KL)",
        DML_TERMS,
        "Deep Mutual Learning (Zhang et al., CVPR 2018): two students of the same architecture, each CE + "
        "KL(peer || self), T 1; no pre-trained teacher",
        "forward_kl",
        {"kind": "online"},
    ),
    "bdkd+online": Setting(
        "BD-KD online",
        ONLINE_BDKD,
        "BD-KD's online setting (S26): DML with BD-KD's entropy-balanced divergence on both sides, T 1, "
        "balance 3",
        "bdkd",
        {
            "kind": "online",
            "objectives": [
                {"name": t.objective, "weight": t.weight, "params": t.params} for t in ONLINE_BDKD
            ],
        },
    ),
    "ema+kd": Setting(
        "mean teacher (EMA)",
        (Term("cross_entropy", 1.0), Term("hinton_kd", 1.0, {"temperature": 1.0})),
        "the student's EMA (decay 0.99) as teacher, CE + KL at T 1; no pre-trained teacher",
        "hinton_kd",
        {"kind": "ema", "decay": 0.99},
    ),
    "self+kd": Setting(
        "S22 self-distillation",
        (Term("cross_entropy", 1.0), Term("hinton_kd", 1.0, {"temperature": 1.0})),
        "S22: 3 generations, alpha CE + (1 - alpha) KL(previous || student) at T 1, alpha estimated per "
        "generation on 10% of the training set held out; no pre-trained teacher",
        "hinton_kd",
        {"kind": "self", "generations": 3},
    ),
}


def _declared(entry: Any) -> bool | None:
    value = entry.extra.get("classification")
    return None if value is None else bool(value)


def logit_objective_reason(name: str) -> str | None:
    """None when the registered objective `name` works on classifier logits; else why not."""
    entry = OBJECTIVES.entry(name)
    declared = _declared(entry)
    if declared is True:
        return None
    if declared is False:
        return "declared not for classification"
    if name in NOT_FOR_CLASSIFIERS:
        return NOT_FOR_CLASSIFIERS[name]
    if is_feature_objective(name):
        return "reads intermediate features (a feature row of its own when a setting exists)"
    try:
        objective = entry.factory()
    except Exception as err:  # an objective that cannot be built without parameters
        return f"cannot be built with default parameters ({err})"
    if not objective.needs_teacher:
        return "needs no teacher"
    if objective.student_layers or objective.teacher_layers:
        return "needs intermediate features"
    return None


def default_setting(name: str) -> Setting:
    return Setting(
        name,
        (Term("cross_entropy", 0.1), Term(name, 0.9)),
        "no published CIFAR protocol: the KD protocol's weights (0.1 CE + 0.9 term), the loss's defaults",
        name,
    )


def classification_methods() -> list[tuple[str, Setting]]:
    """(key, setting) for the baseline and every logit objective registered now, in a stable order:
    the baseline, the methods with published settings (in `PUBLISHED`'s order), then the rest by name."""
    usable = [entry.name for entry in OBJECTIVES if logit_objective_reason(entry.name) is None]
    methods: list[tuple[str, Setting]] = [(BASELINE, STUDENT_ALONE)]
    for key, setting in PUBLISHED.items():
        if setting.objective in usable:
            methods.append((key, setting))
    methods += [(name, default_setting(name)) for name in usable if name not in PUBLISHED]
    methods += [
        (key, setting)
        for key, setting in FEATURE_SETTINGS.items()
        if setting.objective in OBJECTIVES and is_feature_objective(setting.objective)
    ]
    return methods + list(REGIME_SETTINGS.items())


def skipped_objectives() -> dict[str, str]:
    """Registered objectives the benchmark does not run, with the reason."""
    out = {}
    featured = {setting.objective for setting in FEATURE_SETTINGS.values()}
    for entry in OBJECTIVES:
        if entry.name in featured:
            continue
        reason = logit_objective_reason(entry.name)
        if reason is not None:
            out[entry.name] = reason
    return out


def select_methods(names: list[str] | None) -> list[tuple[str, Setting]]:
    """All methods, or those named (method keys such as `hinton_kd`, `hinton_kd+ls`, or table labels such
    as `KD`); the baseline is always included."""
    methods = classification_methods()
    if not names:
        return methods
    by_key = {key: (key, s) for key, s in methods}
    by_label = {s.label.lower(): (key, s) for key, s in methods}
    chosen: list[tuple[str, Setting]] = [methods[0]]
    for name in names:
        found = by_key.get(name) or by_label.get(name.lower())
        if found is None:
            hint = nearest(name, list(by_key) + [s.label for _, s in methods])
            suggestion = f"; did you mean '{hint}'?" if hint else f"; known: {', '.join(by_key)}"
            raise UserError(f"--methods: unknown method '{name}'{suggestion}")
        if found not in chosen:
            chosen.append(found)
    return chosen


def method_spec(setting: Setting, epochs: int) -> MethodSpec:
    """The recipe form of a setting, with warm-ups scaled from 240 epochs to `epochs`."""
    return MethodSpec(
        name=setting.label,
        objectives=[
            ObjectiveSpec(
                name=t.objective,
                weight=t.weight,
                params=dict(t.params),
                warmup_epochs=round(t.warmup_epochs * epochs / PROTOCOL_EPOCHS, 3),
            )
            for t in setting.terms
        ],
        teacher=setting.teacher,
    )
