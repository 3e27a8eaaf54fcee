"""LIFT as a method (Shi et al., ICML 2024): lightweight modules in every frozen block
(AdaptFormer by default), a cosine head, the logit-adjusted loss on instance-balanced
batches, one phase of 10 epochs (docs/spec.md §9). The modules are in `lift_model`.

    phase 1   trains the block modules (`tuner/` in every block), the visual prompts if any
              (`vpt_prompt`) and the head; the head starts from the class means of the
              frozen backbone's training features (model.head_init='class_mean', set by
              LIFT's configs) or the text tower

Everything else (the trainer, the step, exports, resume, evaluation, prediction) is the
generic machinery every method runs; LIFT's phase declares no per-example forward for mixed
batches (each task tunes the backbone itself), so serving names it and refuses.
"""

from __future__ import annotations

import functools

from lpt_jax.config.fields import TRAINING, Field, Section, integer, number, one_of, text
from lpt_jax.errors import ConfigError
from lpt_jax.method import losses, registry
from lpt_jax.method.lift_model import LIFT, TUNERS, LiftTuner, bottleneck_width
from lpt_jax.method.phases import Phase

_TUNER_SET = rf"none|({'|'.join(TUNERS)})(\+({'|'.join(TUNERS)}))*"


def _shallow_prompts_need_a_class_token(lift, root) -> None:
    vit = root.model.get(root.model.backbone) if root is not None else None
    if lift.vpt == "shallow" and vit is not None and vit.get("pool_type", "tok") != "tok":
        raise ConfigError(f"model.lift.vpt='shallow' carries its tokens to the end, where "
                          f"pool_type={vit.pool_type!r} would pool them with the image's: use "
                          "'deep', or a backbone with a class token", field="model.lift.vpt")


FIELDS = Section("LIFT's modules in every frozen block and its cosine head (spec §9)", dict(
    tuners=Field("adaptformer", "the modules in every block, '+'-joined: " + ", ".join(TUNERS)
                 + "; 'none': the plain backbone (a linear probe, or BitFit with the block "
                 "biases in phase1.trainable)",
                 text(_TUNER_SET, "'none' or module names joined by '+', e.g. 'adaptformer' "
                      "or 'lora+ssf'")),
    bottleneck=Field(0, "the modules' bottleneck width r (AdaptFormer, Adapter, LoRA); 0: "
                     "LIFT's 2 ** max(0, floor(log2(C / 2L)))",
                     integer(at_least=0, note="0: LIFT's rule")),
    vpt=Field("none", "LIFT's visual prompts: 'shallow' (tokens added before block 0 and "
              "carried through), 'deep' (every block's own tokens) or 'none'",
              one_of("none", "shallow", "deep")),
    vpt_length=Field(10, "prompt tokens (with vpt)", integer(at_least=1))),
    rules=(_shallow_prompts_need_a_class_token,))

LOSS = Section("LIFT's loss on the instance-balanced batch (spec §9)", dict(
    name=Field("logit_adjusted", "'logit_adjusted': CE(scale z + tau log prior) (Menon et al.); "
               "'ce': plain cross-entropy of scale z", one_of("logit_adjusted", "ce")),
    scale=Field(25.0, "s: the cosines' scale (LIFT's cosine classifier: 25)", number(above=0)),
    tau=Field(1.0, "tau: the weight of the log prior", number(at_least=0))),
    roles=frozenset({TRAINING}))


def objective(config, class_counts, epochs: int):
    """f(forward, params, batch, rng, epoch) -> (loss, {}, [picked]): the loss of the
    instance-balanced batch (LIFT samples no class-balanced one)."""
    del epochs
    lo = config.loss
    constants = {"scale": lo.scale} | ({"tau": lo.tau} if lo.name == "logit_adjusted" else {})
    loss = losses.make_branch_loss(lo.name, class_counts, **constants)

    def f(forward, params, batch, rng, epoch):
        del epoch  # (neither the model nor the loss draws from rng: no dropout, no noise)
        out = forward(params, batch["ib"]["image"], True, rng)
        return loss(out["logits"], batch["ib"]["label"], rng), {}, [out["indices"]]
    return f


PHASES = (
    Phase(1, LIFT.classify, (r"backbone/Transformer/encoderblock_\d+/tuner/.*", "vpt_prompt",
                             r"head/.*"),
          doc="LIFT: the modules in every block and the head", epochs=10, batch_size=128),
)


def _build(model_cfg, num_classes: int, backbone) -> LIFT:
    if not hasattr(backbone, "block_tuner"):
        raise ConfigError(f"model.method='lift' needs a backbone with block hooks "
                          f"(lpt_jax.backbones.layers.BlockTuner); model.backbone="
                          f"{model_cfg.backbone!r} has none", field="model.method")
    lift = model_cfg.lift
    prompts = dict(vpt=lift.vpt, vpt_length=int(lift.vpt_length))
    if lift.tuners == "none":
        return LIFT(backbone=backbone, num_classes=num_classes, **prompts)
    r = lift.bottleneck or bottleneck_width(num_classes, backbone.depth)
    tuner = functools.partial(LiftTuner, tuners=tuple(lift.tuners.split("+")), bottleneck=r)
    return LIFT(backbone=backbone.clone(block_tuner=tuner), num_classes=num_classes, **prompts)


METHOD = registry.Method(
    name="lift", fields=FIELDS, loss=LOSS, phases=PHASES, build=_build, objective=objective,
    probability_scale=lambda config: float(config.loss.scale),
    serving_model=lambda model_cfg, backbone: None,  # no phase serves mixed batches
    streams=lambda config: ("ib",))
registry.register(METHOD)
