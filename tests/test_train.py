"""Fine-tuning (mlx_music.train) against transformers + peft on the tiny models.

Loss: the same codes, captions and (melody) chroma through transformers'
``Musicgen*ForConditionalGeneration(labels=...)`` and `batch_loss`, labels built as the dreambooth
script builds them (rows of different lengths, so the -100 padding is exercised).
Gradients: peft LoRA factors (random A and B: peft's B=0 would zero every A gradient) injected into
both sides; torch autograd vs `nn.value_and_grad`, then 5 AdamW steps on each side.
"""

from __future__ import annotations

import copy

import mlx_music  # noqa: F401  (before mlx.core: binds MKL)
import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from mlx_music.converters.adapters import _mlx_module  # noqa: E402
from mlx_music.converters.manifest import custom_manifest  # noqa: E402
from mlx_music.runtime import load  # noqa: E402
from mlx_music.train.lora import LoraSettings, apply_lora, lora_factors, set_lora_factors  # noqa: E402
from mlx_music.train.loss import batch_loss, build_labels, decoder_inputs  # noqa: E402
from mlx_music.train.step import OptimSettings, Stepper, make_optimizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = {"text": ["80s pop with synths", "calm piano jazz drums"], "melody": ["80s pop", "calm piano"]}


def make_batch(pipe, seed: int = 0, lengths=(12, 9)):
    """Random codes (rows of different lengths), captions, chroma; numpy labels/inputs."""
    m = pipe.model
    k, ch = m.decoder_args.num_codebooks, m.decoder_args.audio_channels
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, 2048, (k, f)) for f in lengths]
    labels = build_labels(codes, ch, 2048)
    ids, mask = pipe.tokenizer(PROMPTS["melody" if m.is_melody else "text"])
    chroma = rng.random((len(lengths), 7, 12)).astype(np.float32) if m.is_melody else None
    return dict(labels=labels, inputs=decoder_inputs(labels, 2048, 2048), ids=ids, mask=mask, chroma=chroma)


def mlx_batch(pipe, b):
    t5 = pipe.model.text_encoder(mx.array(b["ids"]), mx.array(b["mask"]))
    out = dict(inputs=mx.array(b["inputs"]), labels=mx.array(b["labels"]), text=t5, text_mask=mx.array(b["mask"]),
               drop=mx.zeros((b["ids"].shape[0],), mx.bool_))
    if b["chroma"] is not None:
        out["chroma"] = mx.array(b["chroma"])
    return out


def hf_kwargs(b):
    kw = dict(input_ids=torch.tensor(b["ids"]).long(), attention_mask=torch.tensor(b["mask"]).long(),
              labels=torch.tensor(b["labels"].transpose(0, 2, 1)).long())
    if b["chroma"] is not None:
        kw["input_features"] = torch.tensor(b["chroma"])
    return kw


def hf_copy(hf_models, arch):
    hf = copy.deepcopy(hf_models(arch))
    hf.config.decoder.decoder_start_token_id = 2048  # what the dreambooth script sets (absent in 5.x)
    return hf


@pytest.mark.parametrize("arch", ["mono", "stereo", "melody"])
def test_loss_equals_transformers(arch, hf_models, mlx_folder):
    pipe = load(mlx_folder(arch))
    b = make_batch(pipe)
    ours = float(batch_loss(pipe.model, **{k: v for k, v in mlx_batch(pipe, b).items()}))
    with torch.no_grad():
        ref = float(hf_copy(hf_models, arch)(**hf_kwargs(b)).loss)
    assert np.isfinite(ref) and ref > 1.0
    assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref)), (ours, ref)
    # the batch has -100 padding (rows of 12 and 9 frames), so the masking is compared too
    assert b["labels"][1, 0, -1] == -100


TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "enc_to_dec_proj", "lm_heads.0", "lm_heads.2",
           "embed_tokens.1", "embed_tokens.3"]


def peft_model(hf, seed: int, r: int = 4, alpha: float = 8.0):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def peft_factors(pm) -> dict[str, tuple[str, str, bool]]:
    """MLX module -> (peft param holding our a, param holding our b, transposed?): Linear a = lora_A,
    b = lora_B; Embedding a = lora_embedding_B^T, b = lora_embedding_A^T."""
    rules = custom_manifest().rules
    out = {}
    for name, _ in pm.named_parameters():
        if ".lora_A." in name:
            hf_mod = name[len("base_model.model."):].split(".lora_A.")[0]
            out[_mlx_module(hf_mod, rules)] = (name, name.replace(".lora_A.", ".lora_B."), False)
        elif ".lora_embedding_A." in name:
            hf_mod = name[len("base_model.model."):].split(".lora_embedding_A.")[0]
            out[_mlx_module(hf_mod, rules)] = (name.replace("_A.", "_B."), name, True)
    return out


def as_ours(t, transposed: bool) -> np.ndarray:
    t = t.detach().numpy() if hasattr(t, "detach") else t.numpy()
    return np.ascontiguousarray(t.T) if transposed else t


def test_lora_gradients_and_adamw_steps_equal_peft(hf_models, mlx_folder):
    pipe = load(mlx_folder("mono"))
    settings = LoraSettings(rank=4, alpha=8.0)
    wrapped = apply_lora(pipe.model, TARGETS, settings)
    pm = peft_model(hf_copy(hf_models, "mono"), seed=3).eval()
    names = peft_factors(pm)
    params = dict(pm.named_parameters())
    assert set(names) == set(lora_factors(wrapped))  # same modules adapted on both sides
    assert len(names) == 2 * 10 + 1 + 2 + 2  # 2 layers x (self q,k,v,out + cross q,k,v,out + fc1, fc2), proj,
    #                                         2 heads, 2 embedding tables
    set_lora_factors(wrapped, {m: (mx.array(as_ours(params[a], t)), mx.array(as_ours(params[b], t)))
                               for m, (a, b, t) in names.items()})
    b = make_batch(pipe, seed=1)
    batch = mlx_batch(pipe, b)

    # Adam divides each gradient by its own magnitude + eps: an entry whose gradient is at the float
    # noise floor (one here is 9e-8 against a max of 0.6) gets an update set by that noise. eps 1e-4
    # (the same on both sides) keeps such entries from deciding the comparison; others are untouched.
    s = OptimSettings(lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-4, clip=0.0)
    stepper = Stepper(pipe.model, make_optimizer(s, constant=True), clip=0.0)
    loss, grads = stepper.gradients([batch])
    mx.eval(loss, grads)
    out = pm(**hf_kwargs(b))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    ours = {}
    for path, layer in wrapped.items():
        g = grads
        for part in path.split("."):
            g = g[int(part)] if part.isdigit() else g[part]
        for i, t in enumerate(layer.targets):
            ours[t] = (np.array(g["lora_a"][i]), np.array(g["lora_b"][i]))
    worst = 0.0
    for mod, (a, bname, t) in names.items():
        for mine, ref in ((ours[mod][0], as_ours(params[a].grad, t)), (ours[mod][1], as_ours(params[bname].grad, t))):
            assert np.abs(ref).max() > 0
            worst = max(worst, float(np.abs(mine - ref).max() / np.abs(ref).max()))
    assert worst <= 1e-4, worst
    # 5 AdamW steps, same data and settings
    topt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.999),
                             eps=1e-4, weight_decay=0.01)
    topt.zero_grad()
    for _ in range(5):
        pm(**hf_kwargs(b)).loss.backward()
        topt.step()
        topt.zero_grad()
        stepper.step([batch])
    mine = lora_factors(wrapped)
    worst = 0.0
    for mod, (a, bname, t) in names.items():
        for x, ref in ((mine[mod][0], params[a]), (mine[mod][1], params[bname])):
            ref = as_ours(ref, t)
            worst = max(worst, float(np.abs(np.array(x) - ref).max() / np.abs(ref).max()))
    assert worst <= 1e-4, worst


def test_grad_checkpoint_gives_the_same_gradients(mlx_folder):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_music.train.lora import grad_checkpoint
    from mlx_music.train.step import _loss

    out = []
    for checkpointed in (False, True):
        pipe = load(mlx_folder("mono"))
        wrapped = apply_lora(pipe.model, TARGETS, LoraSettings(rank=4, alpha=8.0), seed=1)
        rng = np.random.default_rng(0)
        set_lora_factors(wrapped, {m: (a, mx.array(rng.normal(0, 0.1, b.shape).astype(np.float32)))
                                   for m, (a, b) in lora_factors(wrapped).items()})
        if checkpointed:
            grad_checkpoint(pipe.model)
        loss, g = nn.value_and_grad(pipe.model, _loss)(pipe.model, mlx_batch(pipe, make_batch(pipe)))
        out.append((float(loss), dict(tree_flatten(g))))
    assert out[0][0] == out[1][0]
    assert all(float(mx.abs(v).max()) > 0 for v in out[0][1].values())
    assert max(float(mx.abs(out[0][1][k] - out[1][1][k]).max()) for k in out[0][1]) <= 1e-6


def test_grad_accumulation_equals_the_whole_batch(mlx_folder):
    """Two micro-batches of 2 rows (same lengths) give the gradients of the batch of 4."""
    from mlx.utils import tree_flatten

    pipe = load(mlx_folder("mono"))
    wrapped = apply_lora(pipe.model, TARGETS, LoraSettings(rank=4, alpha=8.0), seed=2)
    rng = np.random.default_rng(1)
    set_lora_factors(wrapped, {m: (a, mx.array(rng.normal(0, 0.1, b.shape).astype(np.float32)))
                               for m, (a, b) in lora_factors(wrapped).items()})
    stepper = Stepper(pipe.model, make_optimizer(OptimSettings(), constant=True), clip=0.0)
    halves = [make_batch(pipe, seed=s, lengths=(10, 10)) for s in (3, 4)]
    whole = {k: np.concatenate([h[k] for h in halves]) for k in ("labels", "inputs", "ids", "mask")}
    whole["chroma"] = None
    for h in halves:  # same caption lengths in both halves, so the text pads alike
        assert h["ids"].shape == halves[0]["ids"].shape
    loss2, g2 = stepper.gradients([mlx_batch(pipe, h) for h in halves])
    loss1, g1 = stepper.gradients([mlx_batch(pipe, whole)])
    a, b = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert abs(float(loss1) - float(loss2)) <= 1e-6 * float(loss1)
    assert max(float(mx.abs(a[k] - b[k]).max() / mx.abs(a[k]).max()) for k in a) <= 1e-5
