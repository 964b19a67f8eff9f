"""A small real ImageFolder for the imagenet tests: JPEGs of mixed sizes, one grayscale, one CMYK
and one PNG named .JPEG (as ImageNet has), written with PIL."""
import os

import numpy as np


def write_image_folder(root, classes=3, train_per_class=6, val_per_class=3, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for k in range(per_class):
                w, h = int(rng.integers(40, 81)), int(rng.integers(40, 81))
                # class-dependent colour so that a tiny net can learn something
                base = np.array([(c * 90) % 256, (c * 50 + 80) % 256, (255 - c * 70) % 256], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                im = Image.fromarray(img)
                path = os.path.join(folder, f"{split}_{c}_{k}.JPEG")
                if split == "train" and c == 0 and k == 0:
                    im.convert("L").save(path, "JPEG", quality=90)        # grayscale
                elif split == "train" and c == 1 and k == 0:
                    im.convert("CMYK").save(path, "JPEG", quality=90)     # CMYK
                elif split == "val" and c == 2 and k == 0:
                    im.save(path, "PNG")                                  # PNG named .JPEG
                else:
                    im.save(path, "JPEG", quality=90)
    return root
