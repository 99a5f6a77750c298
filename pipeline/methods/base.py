"""The method interface: a method draws its batch, returns named losses, and knows how its student samples.

The trainer (pipeline/trainer.py) owns optimisers, EMA, checkpoints and the loop; a method stays small
(like minRF's rf.py). Methods register by name so new ones plug in without touching the trainer; the
registry's readers (get_method, ladder order) live in pipeline/methods/__init__.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.sampling import euler
from pipeline.schedule import piecewise_sigmas
from pipeline.teachers.base import sd3_velocity

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    if not cls.name or not cls.description:
        raise ValueError(f"method {cls.__name__} needs a name and a description")
    METHODS[cls.name] = cls
    return cls


class MethodOptions(BaseModel):
    """A method's `train.method_options.<name>` (and its variants' `options`): one field per option, with its
    default; an undeclared option is refused when the config loads."""
    model_config = ConfigDict(extra="forbid")


@dataclass
class MethodContext:
    """What a method may use. Two random streams, each with one job: a batch's draws come from its StepRows'
    `rng` (the loader's batch_rng, seeded per step), the step's own draws (chord times, noise inside a loss)
    from `step_rng`."""
    cfg: Any                      # schemas.config.RunConfig
    teacher: Any                  # pipeline.teachers.base.Teacher (frozen)
    rows: Any                     # pipeline.data.RowSource: the rows of any step (`rows.at(step)`)
    solves: Any                   # pipeline.teacher_solves.TeacherSolves: teacher solves on the device
    edges: torch.Tensor           # the K + 1 window edges on the fixed grid, [1, ..., 0]
    device: torch.device
    step_rng: torch.Generator     # the step's own draws (seeded from (seed, rank); saved in checkpoints)
    options: dict[str, Any]       # train.method_options[name]


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""             # one paragraph: the model card's and docs' summary of the method
    # Every option `train.method_options.<name>` may set, with its default and type: an option not declared
    # here is rejected when the config loads (schemas.config.method_problem), before any work.
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # Place on the ablation ladder (FlowSteer Table 5 order; None = not a ladder row) and the ladder's runs of
    # this method, in order: (run name, options); the plain method is (name, {}).
    ladder_rank: ClassVar[float | None] = None
    ladder_rows: ClassVar[tuple[tuple[str, dict[str, Any]], ...] | None] = None
    # True when the method reads `train.adversarial` (a discriminator): only then do those keys enter its runs'
    # fingerprint, so a GAN ablation retrains the GAN runs and reuses every other student (schemas/config.py)
    uses_adversarial: ClassVar[bool] = False
    # Student forwards a step keeps a graph for, in units of one batch-sized call (`flowsteer plan` scales the
    # activations by it): the distillation call, plus e.g. the GAN's fake and the discriminator blocks it feeds
    graph_calls: ClassVar[float] = 1.0
    # False when the method calls the student with weights of its own (torch.func.functional_call): FSDP2's
    # sharded parameters cannot be swapped so, and train.sharding fsdp refuses the method at load
    shards: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.options = self.parse_options(ctx.options)

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return cls.Options().model_dump()

    @classmethod
    def parse_options(cls, given: dict[str, Any] | None, where: str | None = None) -> dict[str, Any]:
        """The options over their defaults; an unknown or ill-typed option is one UserError line naming it."""
        from pipeline.errors import UserError

        where = where or f"train.method_options.{cls.name}"
        given = dict(given or {})
        unknown = sorted(set(given) - set(cls.Options.model_fields))
        if unknown:
            raise UserError(f"{where}.{unknown[0]}: unknown option (known for {cls.name}: "
                            f"{', '.join(sorted(cls.Options.model_fields)) or 'none'})")
        try:
            return cls.Options(**given).model_dump()
        except ValidationError as exc:
            e = exc.errors()[0]
            raise UserError(f"{where}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}") from None

    @classmethod
    def runs_on_ladder(cls) -> tuple[tuple[str, dict[str, Any]], ...]:
        """This method's ladder rows (none when it has no ladder_rank)."""
        if cls.ladder_rank is None:
            return ()
        return cls.ladder_rows or ((cls.name, {}),)

    @classmethod
    def check_config(cls, cfg, options: dict[str, Any]) -> None:
        """Refuse, with one UserError line, a config this method cannot train (called before anything runs)."""

    @classmethod
    def x0_source(cls, cfg, options: dict[str, Any]) -> str | None:
        """Where the method's clean samples x0 come from ("digits", "latents", "teacher_samples"; None: it uses
        none); written into the export's flowsteer.json so the report can label the row."""
        return None

    # --- the student network
    def make_student(self, teacher_transformer: torch.nn.Module) -> torch.nn.Module:
        """The trainable full student, initialised from the teacher (a float32 deep copy by default: master
        weights even for a bf16 teacher, docs/precision.md)."""
        import copy

        return self.wrap_student(copy.deepcopy(teacher_transformer).float()).train().requires_grad_(True)

    def wrap_student(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """The student network around an SD3 transformer (default: the transformer itself). A LoRA student
        wraps the teacher's own transformer (pipeline/lora.py); what the wrapper adds trains in full."""
        return transformer

    # True when the saved student is a plain SD3Transformer2DModel that StableDiffusion3Pipeline runs as
    # trained (Euler on the fixed grid). False: the export puts it under `flow_map/`, not `transformer/`,
    # so a plain-diffusers load fails loudly instead of silently dropping what the pipeline cannot feed.
    drop_in: ClassVar[bool] = True

    @classmethod
    def save_student(cls, student: torch.nn.Module, directory) -> None:
        """Write the student as a diffusers model directory (overridden when the student is not plain SD3)."""
        student.save_pretrained(str(directory))

    @classmethod
    def load_student(cls, directory, device) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(str(directory)).to(device).eval()

    @staticmethod
    def velocity(student: torch.nn.Module, x, sigma, cond, **extra) -> torch.Tensor:
        return sd3_velocity(student, x, sigma, cond)

    # --- one training step: batch = complete(draw(step, rows)), split where the work runs (pipeline/loader.py)
    def draw(self, step: int, rows) -> dict[str, Any]:
        """This step's rows on the CPU, in a loader worker: reads and draws from `rows` (a pipeline.data.StepRows)
        only, never the teacher, the device or step_rng; tensors (nested in dicts) come back."""
        raise NotImplementedError

    def complete(self, drawn: dict[str, Any]) -> dict[str, Any]:
        """The batch from the drawn rows, already on the device, in the training process: the teacher solves it
        needs (ctx.solves, timed as teacher_data_s), once per step."""
        return drawn

    def batch(self, step: int) -> dict[str, Any]:
        """Draw and complete step's batch in this process (tests; the trainer goes through its loader)."""
        with torch.no_grad():
            return self.complete(self.ctx.solves.to_device(self.draw(step, self.ctx.rows.at(step))))

    def generator_losses(self, student: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Named losses for the student; key 'loss' is the total that is back-propagated."""
        raise NotImplementedError

    def discriminator(self) -> torch.nn.Module | None:
        """A trainable discriminator, if the method has one (the trainer gives it its own optimiser)."""
        return None

    def discriminator_losses(self, student, batch: dict, step: int) -> dict[str, torch.Tensor] | None:
        return None

    def after_step(self, student: torch.nn.Module, step: int) -> None:
        """Hook after the optimiser step (e.g. SCFlow's target EMA)."""

    def export_meta(self) -> dict[str, Any]:
        """What the export's flowsteer.json records about how this student was trained (e.g. its grid)."""
        return {"grid": "fixed"}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- sampling with the trained student (export, evaluate, `flowsteer sample`)
    @classmethod
    @torch.no_grad()
    def sample(cls, student: torch.nn.Module, noise: torch.Tensor, cond: dict, nfe: int, num_windows: int,
               shift: float, callback=None, sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """Default: guidance-free Euler on the piecewise grid (every window edge is a step point), or on
        `sigmas` (nfe + 1 values, e.g. diffusers' default scheduler grid) when given."""
        sigmas = (piecewise_sigmas(nfe, num_windows, shift) if sigmas is None else sigmas).to(noise.device)
        return euler(lambda x, s, c: cls.velocity(student, x, s, c), noise, sigmas, cond, callback)
