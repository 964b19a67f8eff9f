r"""The SAM code's AutoAugment: its CIFAR and SVHN policies and its operations, on uint8 CHW tensors.

Source: google-research/sam at dae9904c4cf3a57a304f7b04cecffe371679c702, autoaugment/policies.py
(`policy_cifar`: 95 sub-policies, `policy_svhn`: 25) and autoaugment/autoaugment.py (a fork of
tensorflow/tpu's EfficientNet autoaugment.py), called by sam_jax/datasets/augmentation.py on each
uint8 training image before flip and crop. It is NOT torchvision's AutoAugment (25 CIFAR-10
sub-policies, PIL-style magnitudes): `data_utils.autoaugment_policy(..., name="sam")` selects it.

Per image: one sub-policy drawn uniformly; each of its two (op, p, level) applied with probability p.
Level ℓ ∈ 0..10 maps to (`level_to_arg`, hparams cutout_const 100, translate_const 250):
  Rotate ±30ℓ/10°, ShearX/Y ±0.3ℓ/10, TranslateX/Y ±250ℓ/10 px (sign ± with probability ½ each),
  Color/Contrast/Brightness/Sharpness factor 1.8ℓ/10 + 0.1, Posterize ⌊4ℓ/10⌋ bits,
  Solarize threshold ⌊256ℓ/10⌋, Cutout half-size ⌊100ℓ/10⌋ px; the rest take no argument.
The constants were set for ImageNet-size images and are kept: on 32×32 images a translation of
level ≥ 2 (≥ 50 px) or a Cutout of level ≥ 3 greys out (nearly) the whole image.

Operations (as the TF code defines them; uint8 in, uint8 out; ⌊·⌋ = truncation of the cast):
- blend(a, b, f) = ⌊a + f·(b − a)⌋ in float32, clipped to [0, 255] when f ∉ [0, 1]
  (a when f = 0, b when f = 1). Color = blend(gray, x, f); Brightness = blend(0, x, f);
  Contrast = blend(c, x, f) with c = ⌊H·W/256⌋ everywhere: the code's "mean" is the grey-level
  histogram's SUM over 256 bins, a constant (4 at 32×32), not the mean pixel value;
  Sharpness = blend(s, x, f), s = ⌊clip(x ∗ [[1,1,1],[1,5,1],[1,1,1]]/13)⌋ inside, x on the border.
- gray = ⌊255.5·Σ_c w_c·(x_c/255)⌋, w = (0.2989, 0.5870, 0.1140) (tf.image.rgb_to_grayscale).
- AutoContrast per channel: ⌊clip(x·s − lo·s)⌋, s = 255/(hi − lo) (unchanged when hi = lo).
- Equalize, Invert, Posterize, Solarize (x ≥ t → 255 − x; t = 256 changes nothing): exactly
  torchvision's functional ops (their definitions are the same), so those are used.
- Geometric ops map each output pixel (x, y) to an input point with a 3×3 projective transform,
  nearest neighbour (rounded half away from zero, as std::round), 128 (grey) outside:
  ShearX (x + s·y, y), ShearY (x, s·x + y), TranslateX (x + d, y), TranslateY (x, y + d),
  Rotate by θ about the centre (tfa.image.rotate's transform: cos θ, −sin θ, offsets).
- Cutout: centre (cy, cx) uniform over the image, rows [max(0, cy−p), min(H, cy+p)) and the same
  for columns set to 128.
"""
import math

import torch
import torchvision.transforms.functional as TF

_CIFAR = """
Invert .1 7 Contrast .2 6|Rotate .7 2 TranslateX .3 9|Sharpness .8 1 Sharpness .9 3|ShearY .5 8 TranslateY .7 9
AutoContrast .5 8 Equalize .9 2|Solarize .4 5 AutoContrast .9 3|TranslateY .9 9 TranslateY .7 9
AutoContrast .9 2 Solarize .8 3|Equalize .8 8 Invert .1 3|TranslateY .7 9 AutoContrast .9 1
Solarize .4 5 AutoContrast 0 2|TranslateY .7 9 TranslateY .7 9|AutoContrast .9 0 Solarize .4 3
Equalize .7 5 Invert .1 3|TranslateY .7 9 TranslateY .7 9|Solarize .4 5 AutoContrast .9 1
TranslateY .8 9 TranslateY .9 9|AutoContrast .8 0 TranslateY .7 9|TranslateY .2 7 Color .9 6
Equalize .7 6 Color .4 9|ShearY .2 7 Posterize .3 7|Color .4 3 Brightness .6 7|Sharpness .3 9 Brightness .7 9
Equalize .6 5 Equalize .5 1|Contrast .6 7 Sharpness .6 5|Brightness .3 7 AutoContrast .5 8
AutoContrast .9 4 AutoContrast .5 6|Solarize .3 5 Equalize .6 5|TranslateY .2 4 Sharpness .3 3
Brightness 0 8 Color .8 8|Solarize .2 6 Color .8 6|Solarize .2 6 AutoContrast .8 1|Solarize .4 1 Equalize .6 5
Brightness 0 0 Solarize .5 2|AutoContrast .9 5 Brightness .5 3|Contrast .7 5 Brightness 0 2
Solarize .2 8 Solarize .1 5|Contrast .5 1 TranslateY .2 9|AutoContrast .6 5 TranslateY 0 9
AutoContrast .9 4 Equalize .8 4|Brightness 0 7 Equalize .4 7|Solarize .2 5 Equalize .7 5
Equalize .6 8 Color .6 2|Color .3 7 Color .2 4|AutoContrast .5 2 Solarize .7 2|AutoContrast .2 0 Equalize .1 0
ShearY .6 5 Equalize .6 5|Brightness .9 3 AutoContrast .4 1|Equalize .8 8 Equalize .7 7|Equalize .7 7 Solarize .5 0
Equalize .8 4 TranslateY .8 9|TranslateY .8 9 TranslateY .6 9|TranslateY .9 0 TranslateY .5 9
AutoContrast .5 3 Solarize .3 4|Solarize .5 3 Equalize .4 4|Color .7 7 TranslateX .5 8
Equalize .3 7 AutoContrast .4 8|TranslateY .4 3 Sharpness .2 6|Brightness .9 6 Color .2 8|Solarize .5 2 Invert 0 3
AutoContrast .1 5 Brightness 0 0|Cutout .2 4 Equalize .1 1|Equalize .7 7 AutoContrast .6 4|Color .1 8 ShearY .2 3
ShearY .4 2 Rotate .7 0|ShearY .1 3 AutoContrast .9 5|TranslateY .3 6 Cutout .3 3|Equalize .5 0 Solarize .6 6
AutoContrast .3 5 Rotate .2 7|Equalize .8 2 Invert .4 0|Equalize .9 5 Color .7 0|Equalize .1 1 ShearY .1 3
AutoContrast .7 3 Equalize .7 0|Brightness .5 1 Contrast .1 7|Contrast .1 4 Solarize .6 5|Solarize .2 3 ShearX 0 0
TranslateX .3 0 TranslateX .6 0|Equalize .5 9 TranslateY .6 7|ShearX .1 0 Sharpness .5 1|Equalize .8 6 Invert .3 6
AutoContrast .3 9 Cutout .5 3|ShearX .4 4 AutoContrast .9 2|ShearX 0 3 Posterize 0 3|Solarize .4 3 Color .2 4
Equalize .1 4 Equalize .7 6|Equalize .3 8 AutoContrast .4 3|Solarize .6 4 AutoContrast .7 6
AutoContrast .2 9 Brightness .4 8|Equalize .1 0 Equalize 0 6|Equalize .8 4 Equalize 0 4|Equalize .5 5 AutoContrast .1 2
Solarize .5 5 AutoContrast .9 5|AutoContrast .6 1 AutoContrast .7 8|Equalize .2 0 AutoContrast .1 2
Equalize .6 9 Equalize .4 4
"""
_SVHN = """
ShearX .9 4 Invert .2 3|ShearY .9 8 Invert .7 5|Equalize .6 5 Solarize .6 6|Invert .9 3 Equalize .6 3
Equalize .6 1 Rotate .9 3|ShearX .9 4 AutoContrast .8 3|ShearY .9 8 Invert .4 5|ShearY .9 5 Solarize .2 6
Invert .9 6 AutoContrast .8 1|Equalize .6 3 Rotate .9 3|ShearX .9 4 Solarize .3 3|ShearY .8 8 Invert .7 4
Equalize .9 5 TranslateY .6 6|Invert .9 4 Equalize .6 7|Contrast .3 3 Rotate .8 4|Invert .8 5 TranslateY 0 2
ShearY .7 6 Solarize .4 8|Invert .6 4 Rotate .8 4|ShearY .3 7 TranslateX .9 3|ShearX .1 6 Invert .6 5
Solarize .7 2 TranslateY .6 7|ShearY .8 4 Invert .8 8|ShearX .7 9 TranslateY .8 3|ShearY .8 5 AutoContrast .7 3
ShearX .7 2 Invert .1 5
"""


def _parse(text):
    """'Op p level Op p level|...' → [[(op, p, level), (op, p, level)], ...] (the policies.py lists)."""
    out = []
    for sub in text.replace("\n", "|").split("|"):
        w = sub.split()
        if w:
            out.append([(w[0], float(w[1]), int(w[2])), (w[3], float(w[4]), int(w[5]))])
    return out


POLICIES = {"cifar": _parse(_CIFAR), "svhn": _parse(_SVHN)}
GREY = 128  # replace_value of build_and_apply_nas_policy


def blend(a, b, factor):
    """TF blend: ⌊a + f·(b − a)⌋ (float32), clipped to [0, 255] when extrapolating."""
    if factor == 0.0:
        return a.clone()
    if factor == 1.0:
        return b.clone()
    a32 = a.float()
    temp = a32 + torch.tensor(factor, dtype=torch.float32) * (b.float() - a32)
    if not 0.0 < factor < 1.0:
        temp = temp.clamp(0.0, 255.0)
    return temp.to(torch.uint8)


def grayscale(x):
    """tf.image.rgb_to_grayscale on uint8 (C=3, H, W) → (1, H, W) uint8."""
    f = x.float() * torch.tensor(1.0 / 255.0, dtype=torch.float32)
    w = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float32)
    g = f[0] * w[0] + f[1] * w[1] + f[2] * w[2]
    return (g * torch.tensor(255.5, dtype=torch.float32)).to(torch.uint8).unsqueeze(0)


def color(x, f):
    return blend(grayscale(x).expand_as(x), x, f)


def contrast(x, f):
    h, w = x.shape[-2:]
    const = min(max((h * w) / 256.0, 0.0), 255.0)  # Σ histogram / 256 = the pixel count / 256 (sic)
    return blend(torch.full_like(x, int(const)), x, f)


def brightness(x, f):
    return TF.adjust_brightness(x, f)  # ⌊clip(f·x)⌋ = blend(0, x, f)


def sharpness(x, f):
    k = torch.tensor([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
    c = x.shape[0]
    s = torch.nn.functional.conv2d(x.float().unsqueeze(0), k.expand(c, 1, 3, 3), groups=c)[0]
    smooth = x.clone()
    smooth[:, 1:-1, 1:-1] = s.clamp(0.0, 255.0).to(torch.uint8)  # borders keep the original pixels
    return blend(smooth, x, f)


def autocontrast(x):
    lo = x.amin(dim=(-2, -1), keepdim=True).float()
    hi = x.amax(dim=(-2, -1), keepdim=True).float()
    scale = torch.where(hi > lo, 255.0 / (hi - lo), torch.ones_like(hi))
    offset = torch.where(hi > lo, -lo * scale, torch.zeros_like(lo))
    return (x.float() * scale + offset).clamp(0.0, 255.0).to(torch.uint8)


def solarize(x, threshold):
    return x.clone() if threshold > 255 else TF.solarize(x, threshold)


def project(x, t, fill=GREY):
    """Output pixel (x, y) ← input ((t0·x + t1·y + t2)/k, (t3·x + t4·y + t5)/k), k = t6·x + t7·y + 1,
    nearest (half away from zero), `fill` outside (tfa.image.transform on the wrapped image, then unwrap)."""
    c, h, w = x.shape
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in t])  # float32, as the TF kernel
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    k = t[6] * xs + t[7] * ys + 1.0
    sx = (t[0] * xs + t[1] * ys + t[2]) / k
    sy = (t[3] * xs + t[4] * ys + t[5]) / k
    sx = (torch.sign(sx) * torch.floor(sx.abs() + 0.5)).long()
    sy = (torch.sign(sy) * torch.floor(sy.abs() + 0.5)).long()
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    src = x[:, sy.clamp(0, h - 1), sx.clamp(0, w - 1)]
    return torch.where(inside, src, torch.full_like(src, fill))


def rotate(x, degrees):
    """tfa.image.rotate (angles_to_projective_transforms) by `degrees` about the image centre."""
    h, w = x.shape[-2:]
    a = torch.tensor(degrees * math.pi / 180.0, dtype=torch.float32)
    cos, sin = torch.cos(a), torch.sin(a)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    return project(x, [cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0])


def cutout(x, pad, fill=GREY):
    h, w = x.shape[-2:]
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    out = x.clone()
    out[:, max(0, cy - pad):min(h, cy + pad), max(0, cx - pad):min(w, cx + pad)] = fill
    return out


def _signed(v):
    """The code's _randomly_negate_tensor: −v or v with probability ½ each."""
    return v if torch.rand(()) + 0.5 >= 1.0 else -v


def apply_op(x, name, level):
    """One operation at `level` (0..10), its random sign drawn here."""
    m = level / 10.0
    if name == "AutoContrast":
        return autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    if name == "Invert":
        return TF.invert(x)
    if name == "Posterize":
        return TF.posterize(x, int(m * 4))
    if name == "Solarize":
        return solarize(x, int(m * 256))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        fn = {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}[name]
        return fn(x, m * 1.8 + 0.1)
    if name == "Rotate":
        return rotate(x, _signed(m * 30.0))
    if name == "ShearX":
        return project(x, [1.0, _signed(m * 0.3), 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    if name == "ShearY":
        return project(x, [1.0, 0.0, 0.0, _signed(m * 0.3), 1.0, 0.0, 0.0, 0.0])
    if name == "TranslateX":  # tfa translate by (−d, 0): output (x, y) ← input (x + d, y)
        return project(x, [1.0, 0.0, _signed(m * 250.0), 0.0, 1.0, 0.0, 0.0, 0.0])
    if name == "TranslateY":
        return project(x, [1.0, 0.0, 0.0, 0.0, 1.0, _signed(m * 250.0), 0.0, 0.0])
    if name == "Cutout":
        return cutout(x, int(m * 100))
    raise ValueError(f"unknown operation {name!r}")


class SamAutoAugment(torch.nn.Module):
    """One uniformly drawn sub-policy of `POLICIES[policy]`, each op with its probability; uint8
    (3, H, W) in and out; draws from torch's global RNG (the runner seeds it per sample)."""

    def __init__(self, policy="cifar"):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown SAM AutoAugment policy {policy!r}; valid: {', '.join(POLICIES)}")
        self.policy = POLICIES[policy]

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] != 3:
            raise ValueError("the SAM code's AutoAugment takes uint8 RGB images (3, H, W)")
        sub = self.policy[int(torch.randint(0, len(self.policy), ()))]
        for name, prob, level in sub:
            if torch.rand(()) + prob >= 1.0:  # floor(u + p) as bool: probability p
                x = apply_op(x, name, level)
        return x
