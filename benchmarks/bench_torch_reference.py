"""The PyTorch + timm CPU reference: the LPT release's steps as its users run them (issue 8).

A timm ViT-B/16 (224 px, LayerNorm eps 1e-5, exact GELU, random weights), fp32 on the CPU, and
the PyTorch release's (DongSky/LPT) computations on it: `vit_forward`; `phase1_train_step`
(shared prompt at every block, cosine head, A-GCL on the dual pair, backward to prompt + head,
SGD); `phase2_train_step_reference` and `phase2_inference_reference` (a no_grad query pass,
top-2 of 20 keys, a full main pass with the group prompts); `*_trunk`: the same phase 2 on the
exact shared trunk (18 block evaluations instead of 24, as lpt_jax's `LPT.phase2`).

A separate script because torch and TensorFlow must not share a process: it runs in the oracle
venv (requirements-torch.txt) and imports torch, timm, numpy and harness.py (no lpt_jax).
`bench.py vs_pytorch` runs its child `torch_cases`, `bench.py convert` its `write_release`.

    /work/oracle_venv/bin/python benchmarks/bench_torch_reference.py [--batch 8] [--repeats 3]
    /work/oracle_venv/bin/python benchmarks/bench_torch_reference.py --smoke --results ''
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from functools import partial
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm pulls in huggingface_hub

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
from harness import arg, case, child  # noqa: E402


def import_timm():
    """Imports timm; stubs torchvision's C++ op schemas when the PyPI torchvision wheel cannot
    load them beside the local CPU torch build (the ViT never calls them)."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        stub = torch.library.Library("torchvision", "DEF")
        stub.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        stub.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_timm.stub = stub  # keep the registration alive
    import timm
    return timm


# ------------------------------------------------------------------------------------------
# Configuration.

@dataclasses.dataclass(frozen=True)
class Setup:
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    num_classes: int = 365       # Places-LT
    prompt_length: int = 10
    pool_size: int = 20
    shared_depth: int = 6        # K
    top_k: int = 2
    scale: float = 20.0
    margin: float = 0.1
    label_smoothing: float = 0.1
    head_dropout: float = 0.1
    lr: float = 0.02
    eta: float = 0.5             # weight of the instance-balanced branch at epoch 0


SMOKE = Setup(img_size=32, width=64, num_heads=4, num_classes=10)


def build_backbone(timm, s: Setup, fused_attention: bool) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(
        img_size=s.img_size, patch_size=s.patch_size, embed_dim=s.width, depth=s.depth,
        num_heads=s.num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
        global_pool="token", class_token=True, norm_layer=partial(nn.LayerNorm, eps=1e-5),
        act_layer=nn.GELU)  # nn.GELU() is the exact erf form
    for blk in model.blocks:
        blk.attn.fused_attn = fused_attention
    model.eval()
    model.requires_grad_(False)
    return model


class LPTParams(nn.Module):
    """Shared prompt, group-prompt pool, keys and cosine head (N(0, 0.02^2) / unit columns)."""

    def __init__(self, s: Setup):
        super().__init__()
        p, d = s.prompt_length, s.width
        self.shared_prompt = nn.Parameter(torch.randn(s.depth, p, d) * 0.02)
        self.pool_prompts = nn.Parameter(
            torch.randn(s.pool_size, s.depth - s.shared_depth, p, d) * 0.02)
        self.pool_keys = nn.Parameter(torch.randn(s.pool_size, d) * 0.02)
        self.head = nn.Parameter(F.normalize(torch.rand(d, s.num_classes) * 2 - 1, dim=0))


# ------------------------------------------------------------------------------------------
# The release's computations, written against timm's modules.

def embed(vit, images):
    x = vit._pos_embed(vit.patch_embed(images))  # CLS first, position embedding added
    return vit.norm_pre(vit.patch_drop(x))


def run_blocks(vit, x, start: int, stop: int, extra: Callable[[int], torch.Tensor]):
    """Blocks [start, stop); extra(i) (B, T, D) is appended for block i and dropped after it."""
    for i in range(start, stop):
        tokens = extra(i)
        n = x.shape[1]
        x = vit.blocks[i](torch.cat([x, tokens], dim=1))[:, :n]
    return x


def cls_feature(vit, x):
    return vit.norm(x)[:, 0]


def cosine_logits(feature, head):
    return F.normalize(feature, dim=1) @ F.normalize(head, dim=0)


def shared_extra(lpt, batch: int):
    return lambda i: lpt.shared_prompt[i].unsqueeze(0).expand(batch, -1, -1)


def query_pass(vit, lpt, images, s: Setup):
    """Full pass with the shared prompt at every block -> CLS feature (no gradient)."""
    with torch.no_grad():
        x = run_blocks(vit, embed(vit, images), 0, s.depth, shared_extra(lpt, images.shape[0]))
        return cls_feature(vit, x)


def select(lpt, query, s: Setup):
    """Per-sample cosine top-k of the keys -> (indices (B, k), cosines (B, k))."""
    sims = F.normalize(query, dim=1) @ F.normalize(lpt.pool_keys, dim=1).t()
    cos, idx = sims.topk(s.top_k, dim=1)
    return idx, cos


def group_pass(vit, lpt, x, idx, s: Setup, start: int):
    """Blocks start..L-1; from block K on with [shared_i ; mean of the selected group prompts]."""
    b = x.shape[0]
    group = lpt.pool_prompts[idx].mean(dim=1)  # (B, L-K, P, D)
    shared = shared_extra(lpt, b)

    def extra(i):
        if i < s.shared_depth:
            return shared(i)
        return torch.cat([shared(i), group[:, i - s.shared_depth]], dim=1)

    return run_blocks(vit, x, start, s.depth, extra)


def phase2_reference(vit, lpt, images, s: Setup, train: bool):
    """The release's forward: query pass, then a full main pass. Returns (logits, S)."""
    query = query_pass(vit, lpt, images, s)
    idx, cos = select(lpt, query, s)
    x = group_pass(vit, lpt, embed(vit, images), idx, s, start=0)
    feature = F.dropout(cls_feature(vit, x), s.head_dropout, training=train)
    return cosine_logits(feature, lpt.head), cos.sum(dim=1).mean()


def phase2_trunk(vit, lpt, images, s: Setup, train: bool):
    """Same result on the exact shared trunk: blocks 0..K-1 once, then both branches."""
    with torch.no_grad():
        trunk = run_blocks(vit, embed(vit, images), 0, s.shared_depth,
                           shared_extra(lpt, images.shape[0]))
        query = cls_feature(vit, run_blocks(vit, trunk, s.shared_depth, s.depth,
                                            shared_extra(lpt, images.shape[0])))
    idx, cos = select(lpt, query, s)
    x = group_pass(vit, lpt, trunk, idx, s, start=s.shared_depth)
    feature = F.dropout(cls_feature(vit, x), s.head_dropout, training=train)
    return cosine_logits(feature, lpt.head), cos.sum(dim=1).mean()


def phase1(vit, lpt, images, s: Setup, train: bool):
    x = run_blocks(vit, embed(vit, images), 0, s.depth, shared_extra(lpt, images.shape[0]))
    feature = F.dropout(cls_feature(vit, x), s.head_dropout, training=train)
    return cosine_logits(feature, lpt.head)


def agcl(z, labels, mu_bar, gamma_pos: float, gamma_neg: float, s: Setup):
    """A-GCL on cosine logits z (B, C): Gaussian-clouded margins, asymmetric focusing, smoothing."""
    nu = (torch.randn_like(z) / 3).clamp(-1, 1).abs()
    onehot = F.one_hot(labels, z.shape[1]).to(z.dtype)
    z = z - 0.5 * nu * mu_bar - s.margin * onehot
    logp = F.log_softmax(s.scale * z, dim=1)
    p = logp.exp()
    base = torch.where(onehot > 0, 1 - p, p).clamp_min(1e-12)  # no 0^gamma at p_y = 1
    gamma = onehot * gamma_pos + (1 - onehot) * gamma_neg
    weight = base.pow(gamma)
    target = (1 - s.label_smoothing) * onehot + s.label_smoothing / z.shape[1]
    return -(target * weight * logp).sum(dim=1).mean()


def places_like_mu_bar(num_classes: int) -> torch.Tensor:
    """mu_bar of an exponential long-tail profile from 4980 to 5 images (Places-LT's ends)."""
    counts = 4980 * (5 / 4980) ** (np.arange(num_classes) / max(num_classes - 1, 1))
    mu = np.log(counts.max()) - np.log(counts)
    return torch.tensor(mu / mu.max(), dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# Cases.

@dataclasses.dataclass
class Case:
    name: str
    images_per_call: int
    block_evals_per_image: str
    description: str
    fn: Callable[[], None]
    trainable: tuple = ()


def make_cases(vit, lpt, s: Setup, batch: int) -> dict[str, Case]:
    g = torch.Generator().manual_seed(1)
    images = {k: torch.rand(batch, 3, s.img_size, s.img_size, generator=g) * 2 - 1
              for k in ("cb", "ib")}
    labels = {k: torch.randint(0, s.num_classes, (batch,), generator=g) for k in ("cb", "ib")}
    mu_bar = places_like_mu_bar(s.num_classes)
    agcl_cb = partial(agcl, mu_bar=mu_bar, gamma_pos=0.0, gamma_neg=4.0, s=s)
    agcl_ib = partial(agcl, mu_bar=mu_bar, gamma_pos=0.5, gamma_neg=8.0, s=s)

    def sgd(params):
        return torch.optim.SGD(params, lr=s.lr * batch / 256, momentum=0.9, weight_decay=0.01)

    def vit_forward():
        with torch.no_grad():
            vit.forward_head(vit.forward_features(images["cb"]), pre_logits=True)

    p1_params = (lpt.shared_prompt, lpt.head)
    p1_opt = sgd(p1_params)

    def phase1_step():
        p1_opt.zero_grad(set_to_none=True)
        loss = (agcl_cb(phase1(vit, lpt, images["cb"], s, True), labels["cb"])
                + s.eta * agcl_ib(phase1(vit, lpt, images["ib"], s, True), labels["ib"]))
        loss.backward()
        p1_opt.step()

    p2_params = (lpt.pool_prompts, lpt.pool_keys, lpt.head)
    p2_opt = sgd(p2_params)

    def phase2_step(forward):
        def step():
            p2_opt.zero_grad(set_to_none=True)
            z_cb, s_cb = forward(vit, lpt, images["cb"], s, True)
            z_ib, s_ib = forward(vit, lpt, images["ib"], s, True)
            loss = (agcl_cb(z_cb, labels["cb"]) - 0.5 * s_cb
                    + s.eta * (agcl_ib(z_ib, labels["ib"]) - 0.5 * s_ib))
            loss.backward()
            p2_opt.step()
        return step

    def phase2_inference(forward):
        def infer():
            with torch.no_grad():
                forward(vit, lpt, images["cb"], s, False)
        return infer

    L, K = s.depth, s.shared_depth
    return {c.name: c for c in [
        Case("vit_forward", batch, f"{L} fwd", "plain ViT forward, eval, no_grad",
             vit_forward),
        Case("phase1_train_step", 2 * batch, f"{L} fwd + {L} bwd",
             "shared prompt + cosine head, A-GCL dual pair, SGD step", phase1_step, p1_params),
        Case("phase2_train_step_reference", 2 * batch, f"{2 * L} fwd + {L - K} bwd",
             "release's phase 2: no_grad query pass + full main pass, dual pair, SGD step",
             phase2_step(phase2_reference), p2_params),
        Case("phase2_inference_reference", batch, f"{2 * L} fwd",
             "release's phase-2 inference: query pass + main pass, no_grad",
             phase2_inference(phase2_reference)),
        Case("phase2_train_step_trunk", 2 * batch, f"{2 * L - K} fwd + {L - K} bwd",
             "phase 2 on the exact shared trunk (lpt_jax's computation), dual pair, SGD step",
             phase2_step(phase2_trunk), p2_params),
        Case("phase2_inference_trunk", batch, f"{2 * L - K} fwd",
             "phase-2 inference on the exact shared trunk, no_grad",
             phase2_inference(phase2_trunk)),
    ]}


DEFAULT_CASES = ("vit_forward", "phase1_train_step", "phase2_train_step_reference",
                 "phase2_inference_reference", "phase2_train_step_trunk",
                 "phase2_inference_trunk")


def check_gradients(case: Case, vit, lpt) -> None:
    """After a train step exactly the trainable tensors have gradients: the frozen backbone
    (and, in phase 2, the shared prompt) must never get one."""
    if not case.trainable:
        return
    assert all(p.grad is None for p in vit.parameters()), "backbone got gradients"
    trainable = {id(p) for p in case.trainable}
    for name, p in lpt.named_parameters():
        has = p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0
        assert has == (id(p) in trainable), f"{case.name}: gradient of {name} is {has}"


def self_check(vit, lpt, s: Setup) -> None:
    """Cheap equivalences, so a wrong wiring cannot pass as a timing: the prompt-free block loop
    reproduces timm's own forward, and the trunk phase 2 reproduces the release's."""
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, s.img_size, s.img_size, generator=g) * 2 - 1
    with torch.no_grad():
        none = lambda i: images.new_zeros(2, 0, s.width)  # noqa: E731
        ours = cls_feature(vit, run_blocks(vit, embed(vit, images), 0, s.depth, none))
        timm_feature = vit.forward_head(vit.forward_features(images), pre_logits=True)
        ref, ref_s = phase2_reference(vit, lpt, images, s, train=False)
        trunk, trunk_s = phase2_trunk(vit, lpt, images, s, train=False)
    assert torch.allclose(ours, timm_feature, atol=1e-5), "block loop != timm forward"
    assert torch.allclose(ref, trunk, atol=1e-5) and torch.allclose(ref_s, trunk_s, atol=1e-6), \
        "trunk phase 2 != reference phase 2"
    assert not torch.allclose(ref, phase1(vit, lpt, images, s, False).detach(), atol=1e-4), \
        "group prompts have no effect"


def freeze_all_but(lpt, trainable) -> None:
    """requires_grad only on what the phase trains, as the release does (in phase 2 the shared
    prompt is frozen, so no backward runs through blocks 0..K-1)."""
    ids = {id(p) for p in trainable}
    for p in lpt.parameters():
        p.requires_grad_(id(p) in ids)
        p.grad = None


def time_case(case: Case, warmup: int, repeats: int, vit, lpt) -> dict:
    freeze_all_but(lpt, case.trainable)
    for _ in range(warmup):
        case.fn()
    check_gradients(case, vit, lpt)
    calls = [harness.timed(case.fn)[:2] for _ in range(repeats)]
    times, cpu = [w for w, _ in calls], [c for _, c in calls]
    median = statistics.median(times)
    # Share of the threads' wall time spent on the CPU: well below 1 means other processes
    # took the cores (the wall-clock numbers are then pessimistic).
    threads = torch.get_num_threads()
    busy = statistics.median(c / (t * threads) for c, t in zip(cpu, times, strict=True))
    return dict(images_per_s=case.images_per_call / median, median_s=median, times_s=times,
                images_per_s_best=case.images_per_call / min(times),
                images_per_cpu_s=case.images_per_call / statistics.median(cpu), cpu_s=cpu,
                cpu_share=busy, images_per_call=case.images_per_call,
                block_evals_per_image=case.block_evals_per_image, description=case.description)


def write_release(path: str, s: Setup = Setup()) -> None:
    """A random release checkpoint of ViT-B/16 size in the release's format (~333 MiB):
    {'config', 'state_dict' (module.-prefixed timm names + prompt_learner.*), 'val_acc'}."""
    g = torch.Generator().manual_seed(0)
    d, m = s.width, 4 * s.width
    grid = s.img_size // s.patch_size

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02
    state = {"cls_token": rand(1, 1, d), "pos_embed": rand(1, 1 + grid ** 2, d),
             "patch_embed.proj.weight": rand(d, 3, s.patch_size, s.patch_size),
             "patch_embed.proj.bias": rand(d), "norm.weight": rand(d), "norm.bias": rand(d)}
    for i in range(s.depth):
        shapes = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
                  "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
                  "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (m, d),
                  "mlp.fc1.bias": (m,), "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,)}
        state.update({f"blocks.{i}.{k}": rand(*v) for k, v in shapes.items()})
    p, pool, shared = s.prompt_length, s.pool_size, s.shared_depth
    state.update({"prompt_learner.Prompt_Tokens": rand(s.depth, p, d),
                  "prompt_learner.Prompt_Tokens_pool": rand(pool, s.depth - shared, p, d),
                  "prompt_learner.Prompt_Keys": rand(pool, d),
                  "prompt_learner.head.weight": rand(d, s.num_classes)})
    torch.save({"config": {"base_model": "vit_base_patch16_224_in21k"},
                "state_dict": {f"module.{k}": v for k, v in state.items()}, "val_acc": 0.5}, path)


# ------------------------------------------------------------------------------------------
# The harness: the case, its fresh-process child, and the release file for `bench.py convert`.

def run_cases(batch: int, repeats: int, warmup: int, names, smoke: bool, fused: bool = True,
              threads: int = 0) -> dict:
    setup = SMOKE if smoke else Setup()
    torch.set_num_threads(threads or os.cpu_count())
    torch.manual_seed(0)
    timm = import_timm()
    vit = build_backbone(timm, setup, fused)
    lpt = LPTParams(setup)
    self_check(vit, lpt, setup)
    cases = make_cases(vit, lpt, setup, batch)
    results = {}
    for name in names:
        r = results[name] = time_case(cases[name], warmup, repeats, vit, lpt)
        harness.log(f"{name:30s} {r['images_per_s']:7.2f} img/s (median {r['median_s']:.2f} s "
                    f"for {r['images_per_call']} images)")
    return dict(cases=results, torch=torch.__version__, timm=timm.__version__,
                threads=torch.get_num_threads(), variant="smoke" if smoke else "B/16",
                image_size=setup.img_size, num_classes=setup.num_classes)


@child("torch_cases")
def torch_cases(p: dict) -> dict:
    return run_cases(p["batch"], p["repeats"], 1, p["cases"], p["smoke"])


@child("write_release")
def write_release_child(p: dict) -> dict:
    write_release(p["path"])
    return dict(path=p["path"], bytes=os.path.getsize(p["path"]))


@case("torch_reference", "torch_reference",
      "the PyTorch + timm CPU reference: the release's LPT steps (oracle venv)",
      arg("--batch", type=int, default=8), arg("--repeats", type=int, default=3),
      arg("--warmup", type=int, default=1),
      arg("--cases", nargs="+", default=list(DEFAULT_CASES), choices=DEFAULT_CASES),
      arg("--attention", choices=("fused", "manual"), default="fused",
          help="timm's fused SDPA (default) or the release's explicit softmax(qk^T)v"),
      arg("--threads", type=int, default=0, help="torch threads (0: all cores)"),
      arg("--smoke", action="store_true", help="tiny model (32 px, width 64), batch 2"))
def torch_reference(args, rec):
    if args.smoke:
        args.batch, args.repeats = 2, 1
    out = run_cases(args.batch, args.repeats, args.warmup, args.cases, args.smoke,
                    args.attention == "fused", args.threads)
    text = (f"ViT {out['variant']}, {out['image_size']} px, {out['num_classes']} classes, fp32, "
            f"LayerNorm eps 1e-5, exact GELU, attention "
            f"{'fused SDPA (timm default)' if args.attention == 'fused' else 'manual'}; torch "
            f"{out['torch']}, timm {out['timm']}, {out['threads']} threads; batch B = "
            f"{args.batch}; median of {args.repeats} calls after {args.warmup}. Train steps: "
            "the dual pair (2B images). CPU share = process CPU time / (wall x threads): near "
            "1 on an idle machine.\n\n")
    text += harness.table(
        ["case", "images/call", "block evals per image", "median s", "images/s",
         "best call, images/s", "images per CPU-s", "CPU share"],
        [[n, r["images_per_call"], r["block_evals_per_image"], f"{r['median_s']:.2f}",
          f"**{r['images_per_s']:.2f}**", f"{r['images_per_s_best']:.2f}",
          f"{r['images_per_cpu_s']:.2f}", f"{r['cpu_share']:.2f}"]
         for n, r in out["cases"].items()])
    text += "\n\n" + "\n".join(f"- `{n}`: {r['description']}." for n, r in out["cases"].items())
    rec.write(text, dict(args=vars(args), **out))


if __name__ == "__main__":
    harness.main(default="torch_reference")
