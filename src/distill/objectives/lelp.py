"""S17 LELP ("Linear Projections of Teacher Embeddings for Few-Class Distillation", Loo, Iliopoulos, Hu &
Vee, 2024, arXiv:2409.20449; Learning Embedding Linear Projections): KD for binary and few-class problems
that splits every class into S pseudo-subclasses read off linear projections of the teacher's final-layer
embedding, and trains the student on the S x C pseudo-subclass distribution.

Sources. No official code was found. The stored arXiv page (arxiv.org/html/2409.20449v2) could be read only
up to its introduction; the method is as reported by several detailed reviews of the ICLR 2025 submission
(OpenReview DKA7Hx7PSt; read as files of public GitHub repositories) that quote its section 3: per-class
PCA of the teacher's embeddings after projecting them onto the null space of the teacher's output weights
("standard knowledge-distillation will already contain all the information along these directions"), a
random orthonormal rotation of the top directions "to equalize variance", pseudo-subclass probabilities
p_{c,s} = p_c exp(z_{c,s} / beta) / sum_j exp(z_{c,j} / beta) with z_{c,s} the projections and beta the
subclass temperature, a student that predicts S x C classes trained by one cross-entropy (KL) over them,
and a one-time PCA whose cost O(N_c D^2 + D^3) is dominated by a forward pass of the training set through
the teacher. The formulas are in `distill.losses.subclasses`.

What this objective owns, and how it fits the trainer:

* **The teacher's subspaces, fitted once from the training set.** The paper runs the teacher over the training
  set before training, and so does the trainer for this objective (`teacher_pass` true, the default:
  `distill.train.feature_taps.teacher_pass`, one pass in file order before the first step, the subspaces
  fitted from every training sample). Without that pass (`teacher_pass: false`, or a cached teacher that holds
  no embeddings) the objective gathers the statistics during training: while `progress.epoch <
  statistics_epochs` (default 1.0: exactly the first epoch, i.e. one pass over every training sample), each
  step adds the batch's teacher embeddings to per-class moments (count, sum, sum of outer products, float64
  buffers: checkpoints carry them, so a run resumed mid-pass continues the same statistics; C x D x D values,
  2.4 MB for two classes of MiniLM's D = 384); at the first step past that point the subspaces are fitted
  (`fit_class_subspaces`) and frozen for the rest of training. Several processes all-reduce the moments before
  the fit. Until the fit the subclass part is absent and the value is plain KD on the student's own
  classifier, T^2 KL(p_C || q_C): the paper's loss with no subclass information yet. A caller that can run the
  teacher over the data first (a pre-training hook, a notebook) calls `observe` on every batch and then `fit`,
  and the whole of training gets the subclass targets, as in the paper. Why not fit per batch: a class's
  covariance in D = 384 dimensions from a handful of samples is noise, and refitting moves (and permutes) the
  pseudo-subclasses under the student every step.
* **Classes for the per-class PCA:** the ground-truth labels when the data has them, else the teacher's
  arg-max (an unlabelled transfer set).
* **The student's S x C head.** The paper widens the student's output layer to S x C classes. Ours keeps the
  student's own C-way classifier and adds an auxiliary linear head from the student's embedding to C x S
  within-class logits a_{c,s}, built in `build` and trained with the student; the student's S x C
  distribution is q_{c,s} = softmax(student_logits / T)_c softmax(a_{c, .})_s. Any S x C distribution can
  be written so (class marginal times within-class conditional), the loss splits exactly into KD on the
  student's classifier plus the subclass term, and the deployed student is the classifier that was
  trained. Difference from the paper: there the class marginal is sum_s of an S x C softmax of one linear
  layer (a log-sum-exp of linear scores), here it is the student's own classifier.
* **The teacher's output layer W** (for the null-space projection, and for the teacher's logits when a step
  carries none) is read when the layers are bound (`resolve_paths`): the teacher's `get_output_embeddings`,
  else its `head` / `fc` / `classifier` linear layer. Its width must equal the teacher embedding's (the
  default layer -1 is the pooled vector, the output layer's input); otherwise, and for a cached teacher, no
  projection is made (the plain class PCA).

Parameters and defaults: `subclasses` S = 4, `temperature` T = 1 (of the class softmax; with Hinton's T^2
factor), `subclass_temperature` beta = 1 over standardised projections (`standardize` true: each class's
projections divided by the root mean variance of its S directions; ours, so that beta is unitless; false
gives the raw projections, whose scale is the teacher's), `null_space` true,
`statistics_epochs` 1.0, `seed` 0 for the rotations. The paper searches S, T and beta per task (its
appendix grid was not readable); these defaults are ours. `num_classes` is needed only when the teacher
has no output layer to count them from (a cached teacher).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.losses.subclasses import fit_class_subspaces, haar_rotations, lelp_kd, subclass_projections
from distill.objectives.base import (
    ParamError,
    StepOutputs,
    flag,
    number_in,
    positive_number,
    shown,
    whole_number,
)
from distill.objectives.features import (
    FeatureObjective,
    layer_ref,
    project,
    register_feature_objective,
    sample_mask,
)


def teacher_output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when it is a plain `nn.Linear`: `get_output_embeddings()`, else a `head` /
    `fc` / `classifier` attribute (the zoo's classifiers and encoders name it so)."""
    getter = getattr(model, "get_output_embeddings", None)
    candidates = [getter() if callable(getter) else None]
    for name in (getattr(model, "classifier_name", None), "head", "fc", "classifier"):
        candidates.append(getattr(model, name, None) if isinstance(name, str) else None)
    return next((c for c in candidates if type(c) is nn.Linear), None)


class LELP(FeatureObjective):
    """LELP: plain KD on the student's classifier plus the pseudo-subclass term, T^2 KL(p || q) over S x C
    pseudo-subclasses of the teacher's embedding (see the module docstring)."""

    needs_teacher_logits = True

    def __init__(
        self,
        *,
        student_layer: Any = -1,
        teacher_layer: Any = -1,
        subclasses: int = 4,
        temperature: float = 1.0,
        subclass_temperature: float = 1.0,
        null_space: bool = True,
        standardize: bool = True,
        statistics_epochs: float = 1.0,
        teacher_pass: bool = True,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__("lelp")
        name = self.loss_name
        self.student_refs = [layer_ref(name, "student_layer", student_layer)]
        self.teacher_refs = [layer_ref(name, "teacher_layer", teacher_layer)]
        self.subclasses = whole_number(name, "subclasses", subclasses, 1, 1024)
        self.temperature = positive_number(name, "temperature", temperature)
        self.subclass_temperature = positive_number(name, "subclass_temperature", subclass_temperature)
        self.null_space = flag(name, "null_space", null_space)
        self.standardize = flag(name, "standardize", standardize)
        self.statistics_epochs = number_in(
            name, "statistics_epochs", statistics_epochs, 0.0, 1.0, low_open=True
        )
        self.teacher_pass = flag(name, "teacher_pass", teacher_pass)
        self.seed = whole_number(name, "seed", seed, 0, 2**32 - 1)
        if num_classes is not None and (
            not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
        ):
            raise ParamError(
                name, "num_classes", f"must be a whole number >= 1 or null, got {shown(num_classes)}"
            )
        self.num_classes = num_classes
        self.head: nn.Module = nn.Identity()
        self._teacher_head = False

    # ------------------------------------------------------------------------------------ setup

    def resolve_paths(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Keep a copy of the teacher's output layer (frozen, so a copy is exact); the layers themselves
        resolve from `student_layer` / `teacher_layer` as usual."""
        layer = teacher_output_layer(teacher) if teacher is not None else None
        if layer is None:
            return None
        weight = layer.weight.detach().float().cpu().clone()
        bias = (
            layer.bias.detach().float().cpu().clone() if layer.bias is not None else torch.zeros(len(weight))
        )
        if self._teacher_head:
            self.teacher_weight, self.teacher_bias = weight, bias
        else:
            self.register_buffer("teacher_weight", weight)
            self.register_buffer("teacher_bias", bias)
            self._teacher_head = True
        return None

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], n_data: int) -> None:
        (student,), (teacher,) = student_shapes, teacher_shapes
        for role, shape, path in (
            ("student", student, self.student_layers[0]),
            ("teacher", teacher, self.teacher_layers[0]),
        ):
            if len(shape) != 2:
                raise UserError(
                    f"objective 'lelp' reads one embedding per sample; the {role}'s '{path}' gives "
                    f"{tuple(shape[1:])} per sample (use the pooled tap, -1)"
                )
        classes = self.num_classes
        if self._teacher_head:
            rows = int(self.teacher_weight.shape[0])
            if classes is not None and classes != rows:
                raise UserError(
                    f"objective 'lelp': num_classes is {classes} but the teacher has {rows} outputs"
                )
            classes = rows
        if classes is None:
            raise UserError(
                "objective 'lelp' cannot tell the number of classes (the teacher has no output layer to "
                "read); set params.num_classes"
            )
        dim, width = int(teacher[1]), int(student[1])
        project_out = self.null_space and self._teacher_head and int(self.teacher_weight.shape[1]) == dim
        free = dim - (int(torch.linalg.matrix_rank(self.teacher_weight.double())) if project_out else 0)
        if self.subclasses > free:
            raise UserError(
                f"objective 'lelp': {self.subclasses} subclasses need as many directions, but the teacher "
                f"embedding has {free} (width {dim}{' outside its output layer' if project_out else ''})"
            )
        self.classes, self.dim, self.project_out = classes, dim, project_out
        self.head = nn.Linear(width, classes * self.subclasses)
        generator = torch.Generator().manual_seed(self.seed)
        self.register_buffer("rotations", haar_rotations(classes, self.subclasses, generator).float())
        self.register_buffer("count", torch.zeros(classes, dtype=torch.float64))
        self.register_buffer("total", torch.zeros(classes, dim, dtype=torch.float64))
        self.register_buffer("outer", torch.zeros(classes, dim, dim, dtype=torch.float64))
        self.register_buffer("directions", torch.zeros(classes, self.subclasses, dim))
        self.register_buffer("offsets", torch.zeros(classes, self.subclasses))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        super().build(student_shapes, teacher_shapes, n_data)

    # ------------------------------------------------------------------------------ subspaces

    @torch.no_grad()
    def observe(self, embeddings: Tensor, classes: Tensor) -> None:
        """Add teacher embeddings (N, D) of the given classes (N,) to the per-class moments (rows of class -1
        or with non-finite values are left out)."""
        if not self.built:
            raise UserError(
                "objective 'lelp' must be built (one probe of the models) before it observes data"
            )
        h = embeddings.detach().to(device=self.total.device, dtype=torch.float64).reshape(len(embeddings), -1)
        c = classes.detach().to(device=self.total.device, dtype=torch.long).reshape(-1)
        keep = (c >= 0) & (c < self.classes) & torch.isfinite(h).all(1)  # non-finite: would spoil the fit
        h, c = h[keep], c[keep]
        self.count.index_add_(0, c, torch.ones_like(c, dtype=torch.float64))
        self.total.index_add_(0, c, h)
        for k in c.unique().tolist():
            rows = h[c == k]
            self.outer[k] += rows.transpose(0, 1) @ rows

    @torch.no_grad()
    def fit(self) -> None:
        """Fit the pseudo-subclass directions from the moments gathered so far (all-reduced over processes)
        and freeze them."""
        moments = [self.count, self.total, self.outer]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in moments:
                torch.distributed.all_reduce(tensor)
        directions, offsets = fit_class_subspaces(
            self.count,
            self.total,
            self.outer,
            subclasses=self.subclasses,
            rotations=self.rotations,
            output_weight=self.teacher_weight if self.project_out else None,
            standardize=self.standardize,
        )
        self.directions.copy_(directions.to(self.directions.dtype))
        self.offsets.copy_(offsets.to(self.offsets.dtype))
        self.fitted.fill_(True)

    def wants_teacher_pass(self) -> bool:
        return self.teacher_pass and not bool(self.fitted)

    def observe_teacher(
        self, features: dict[str, Tensor], logits: Tensor | None, labels: Tensor | None
    ) -> None:
        embeddings = features[self.teacher_layers[0]]
        if labels is not None and labels.shape == embeddings.shape[:1]:
            classes = labels
        elif logits is not None:
            classes = logits.argmax(-1)
        else:
            classes = (embeddings.flatten(1) @ self.teacher_weight.T.to(embeddings)).argmax(-1)
        self.observe(embeddings, classes)

    def finish_teacher_pass(self) -> None:
        if float(self.count.sum()) > 0:
            self.fit()

    # -------------------------------------------------------------------------------- the loss

    def _teacher_logits(self, outputs: StepOutputs, teacher: Tensor) -> Tensor:
        if outputs.teacher_logits is not None:
            return outputs.teacher_logits
        if self._teacher_head and int(self.teacher_weight.shape[1]) == teacher.shape[-1]:
            # A features-only call: the output layer on its own input (exact for the pooled tap, in eval).
            return nn.functional.linear(teacher.float(), self.teacher_weight, self.teacher_bias)
        raise UserError("objective 'lelp' needs the teacher's logits, but the step has none")

    @staticmethod
    def _classes(outputs: StepOutputs, teacher_logits: Tensor, mask: Tensor | None) -> Tensor:
        """Each sample's class for the per-class statistics: its label, else the teacher's arg-max; -1 (left
        out) for masked samples."""
        labels = outputs.labels
        if labels is not None and labels.shape == teacher_logits.shape[:1]:
            classes = labels.to(teacher_logits.device)
        else:
            classes = teacher_logits.argmax(-1)
        if mask is not None:
            classes = torch.where(mask.to(classes.device), classes, torch.full_like(classes, -1))
        return classes

    def forward(self, outputs: StepOutputs) -> Tensor:
        (student,), (teacher,) = self.features(outputs)
        student_logits = outputs.student_logits
        if student_logits.dim() != 2 or student_logits.shape[-1] != self.classes:
            raise UserError(
                f"objective 'lelp' needs (batch, {self.classes}) class logits, got "
                f"{tuple(student_logits.shape)}"
            )
        teacher_logits = self._teacher_logits(outputs, teacher).to(student_logits.device)
        mask = sample_mask(teacher, outputs.mask)
        if not bool(self.fitted):
            gathering = outputs.progress.epoch < self.statistics_epochs
            if gathering or float(self.count.sum()) == 0:  # (resumed past the pass with nothing: this batch)
                self.observe(teacher, self._classes(outputs, teacher_logits, mask))
            if not gathering:
                self.fit()
        subclass_logits = project(self.head, student).float().reshape(-1, self.classes, self.subclasses)
        if bool(self.fitted):
            projections = subclass_projections(teacher.detach(), self.directions, self.offsets)
            return lelp_kd(
                student_logits,
                teacher_logits,
                subclass_logits,
                projections,
                mask=mask,
                temperature=self.temperature,
                subclass_temperature=self.subclass_temperature,
            )
        # No subspaces yet: equal (uniform) conditionals on both sides leave exactly the class term, T^2
        # KL(p_C || q_C); the head joins the graph with zero weight, so that every step trains the same
        # parameters.
        uniform = torch.zeros_like(subclass_logits)
        value = lelp_kd(
            student_logits,
            teacher_logits,
            uniform,
            uniform,
            mask=mask,
            temperature=self.temperature,
            subclass_temperature=self.subclass_temperature,
        )
        return value + 0.0 * subclass_logits.sum()

    def extra_repr(self) -> str:
        state = "fitted" if self.built and bool(self.fitted) else "gathering"
        return f"{super().extra_repr()}, S={self.subclasses}, {state}"


register_feature_objective(
    "lelp",
    LELP,
    summary="KD over S x C pseudo-subclasses from per-class PCA of the teacher embedding (few-class tasks)",
    paper="Loo, Iliopoulos, Hu & Vee, 2024, Linear Projections of Teacher Embeddings for Few-Class "
    "Distillation (S17)",
)
