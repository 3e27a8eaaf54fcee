"""Decoding and augmentation in TF ops, seeded statelessly per image.

Train: RandomResizedCrop (torchvision's sampling: 10 tries of area scale
U(0.08, 1) and log-uniform aspect ratio in [3/4, 4/3], else a centre crop with
the ratio clamped), bilinear resize to the output size, random horizontal flip.
Eval: resize to a square `resize_size` (aspect ratio not kept), centre crop.
Test-time ensemble views (eval.ensemble, LIFT's `tte`): torchvision's Resize to the shorter
side, then FiveCrop or TenCrop.
Pixels end in [-1, 1] (mean = std = 0.5). `antialias=True` matches PIL's
bilinear downscaling, which the PyTorch reference uses.
"""

import math

from lpt_jax.data._tf import tf

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG / PNG / GIF / BMP -> uint8 (h, w, 3)."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def to_unit_range(image: tf.Tensor) -> tf.Tensor:
    """[0, 255] -> [-1, 1] float32."""
    return tf.clip_by_value(tf.cast(image, tf.float32) / 127.5 - 1.0, -1.0, 1.0)


def rrc_window(height, width, seed, scale=RRC_SCALE, ratio=RRC_RATIO,
               attempts: int = RRC_ATTEMPTS) -> tf.Tensor:
    """Crop window [top, left, h, w] (int32) of torchvision's RandomResizedCrop."""
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    u = tf.random.stateless_uniform([attempts, 4], seed=seed, dtype=tf.float32)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = h_f * w_f * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
    aspect = tf.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    cw = tf.round(tf.sqrt(target_area * aspect))
    ch = tf.round(tf.sqrt(target_area / aspect))
    fits = (cw > 0) & (cw <= w_f) & (ch > 0) & (ch <= h_f)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    ch_ok, cw_ok = ch[first], cw[first]
    top_ok = tf.floor(u[first, 2] * (h_f - ch_ok + 1.0))
    left_ok = tf.floor(u[first, 3] * (w_f - cw_ok + 1.0))
    # Fallback: whole image, or a centre crop at the nearest allowed aspect ratio.
    in_ratio = w_f / h_f
    fb_w = tf.where(in_ratio > ratio[1], tf.round(h_f * ratio[1]), w_f)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w_f / ratio[0]), h_f)
    fb_top = tf.floor((h_f - fb_h) / 2.0)
    fb_left = tf.floor((w_f - fb_w) / 2.0)
    ok = tf.reduce_any(fits)
    window = tf.where(ok, tf.stack([top_ok, left_ok, ch_ok, cw_ok]),
                      tf.stack([fb_top, fb_left, fb_h, fb_w]))
    return tf.cast(window, tf.int32)


def _resize(image, size, antialias: bool):
    """Bilinear resize; the (slow) antialiasing kernel only where it changes the result.

    When no axis shrinks, antialiased and plain bilinear agree (to 3e-5 of 255), so an
    upscaled crop, the usual RandomResizedCrop case, takes the plain kernel: ~2x faster.
    """
    plain = lambda: tf.image.resize(image, size, method="bilinear")  # noqa: E731
    if not antialias:
        return plain()
    shrinks = tf.reduce_any(tf.shape(image)[:2] > tf.convert_to_tensor(size, tf.int32))
    return tf.cond(shrinks,
                   lambda: tf.image.resize(image, size, method="bilinear", antialias=True), plain)


def _crop_jpeg(data, seed, fast: bool):
    shape = tf.image.extract_jpeg_shape(data)
    window = rrc_window(shape[0], shape[1], seed)
    if fast:  # decode only the window's blocks
        image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
    else:
        image = tf.image.decode_jpeg(data, channels=3)
        image = image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
    image.set_shape([None, None, 3])
    return image


def _crop_pixels(image, seed):
    shape = tf.shape(image)
    window = rrc_window(shape[0], shape[1], seed)
    return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]


def train_image(payload, kind: str, seed, image_size: int, antialias: bool = True,
                jpeg_fast_crop: bool = True) -> tf.Tensor:
    """One training image -> float32 (image_size, image_size, 3) in [-1, 1].

    payload: encoded bytes ('bytes'), a file path ('path') or uint8 pixels ('pixels').
    seed: int64 [2]; crop and flip get independent sub-seeds.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if kind == "pixels":
        image = _crop_pixels(payload, crop_seed)
    else:
        data = tf.io.read_file(payload) if kind == "path" else payload
        image = tf.cond(tf.io.is_jpeg(data),
                        lambda: _crop_jpeg(data, crop_seed, jpeg_fast_crop),
                        lambda: _crop_pixels(decode_rgb(data), crop_seed))
    image = _resize(image, (image_size, image_size), antialias)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = to_unit_range(image)
    image.set_shape([image_size, image_size, 3])
    return image


def centre_offset(resize_size: int, image_size: int) -> int:
    """torchvision CenterCrop's offset: int(round((R - S) / 2))."""
    return int(round((resize_size - image_size) / 2.0))


def pixels(payload, kind: str) -> tf.Tensor:
    """uint8 (h, w, 3) of a payload: encoded bytes ('bytes'), a file ('path') or pixels."""
    if kind == "pixels":
        return payload
    return decode_rgb(tf.io.read_file(payload) if kind == "path" else payload)


def eval_image(payload, kind: str, resize_size: int, image_size: int,
               antialias: bool = True) -> tf.Tensor:
    """One evaluation image: square resize, centre crop -> float32 in [-1, 1]."""
    image = _resize(pixels(payload, kind), (resize_size, resize_size), antialias)
    o = centre_offset(resize_size, image_size)
    image = image[o:o + image_size, o:o + image_size]
    image = to_unit_range(image)
    image.set_shape([image_size, image_size, 3])
    return image


# ------------------------------------------------------------------------------------------
# Test-time ensemble views (LIFT, Shi et al. ICML 2024, github.com/shijxcs/LIFT trainer.py:
# Resize(resolution + expand), then FiveCrop / TenCrop(resolution), each crop normalised).

ENSEMBLE_VIEWS = {"five_crop": 5, "ten_crop": 10}


def resize_shorter_side(image, size: int, antialias: bool = True) -> tf.Tensor:
    """torchvision's Resize(size) with an int size: the shorter side becomes `size`, the
    longer int(size * long / short) (truncated; in float64 as Python computes it)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = tf.cast(tf.math.floor(tf.cast(size * long, tf.float64)
                                     / tf.cast(short, tf.float64)), tf.int32)
    size = tf.constant(size, tf.int32)
    new_hw = tf.where(h <= w, tf.stack([size, new_long]), tf.stack([new_long, size]))
    return _resize(image, new_hw, antialias)


def five_crop_offsets(height, width, size: int) -> list:
    """(top, left) of torchvision FiveCrop(size)'s crops of an (height, width) image, in its
    order: top-left (0, 0), top-right (0, W - S), bottom-left (H - S, 0), bottom-right
    (H - S, W - S), centre (round((H - S) / 2), round((W - S) / 2)). The centre is
    CenterCrop's int(round(x / 2.0)): Python's round, half to even, as tf.round."""
    dh, dw = height - size, width - size
    half = lambda d: tf.cast(tf.round(tf.cast(d, tf.float64) / 2.0), tf.int32)  # noqa: E731
    return [(0, 0), (0, dw), (dh, 0), (dh, dw), (half(dh), half(dw))]


def five_crop(image, size: int) -> list:
    shape = tf.shape(image)
    return [image[top:top + size, left:left + size]
            for top, left in five_crop_offsets(shape[0], shape[1], size)]


def eval_views(payload, kind: str, image_size: int, expand: int, ensemble: str,
               antialias: bool = True) -> tf.Tensor:
    """The test-time ensemble's views of one image -> float32 (V, S, S, 3) in [-1, 1]:
    resized to S + expand on its shorter side, then torchvision's FiveCrop (V = 5), or
    TenCrop (V = 10: the five, then the five of the resized image flipped left-right)."""
    if ensemble not in ENSEMBLE_VIEWS:
        raise ValueError(f"ensemble={ensemble!r}: expected one of {list(ENSEMBLE_VIEWS)}")
    image = resize_shorter_side(pixels(payload, kind), image_size + expand, antialias)
    crops = five_crop(image, image_size)
    if ensemble == "ten_crop":
        crops += five_crop(tf.image.flip_left_right(image), image_size)
    views = to_unit_range(tf.stack(crops))
    views.set_shape([ENSEMBLE_VIEWS[ensemble], image_size, image_size, 3])
    return views
