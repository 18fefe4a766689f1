"""The one boundary between small images and photos, in pixels on the shorter side.

Up to it, images are trained at their own size (:mod:`lowres_ssl.data.sizes`), ResNets and
ResNet-like library models get a stride-1 stem without max-pool (:mod:`lowres_ssl.models`),
and ``auto`` chooses the small-image recipe and loss. It sits on the lowest floor, below both
``data`` and ``models``, so that every one of them imports it from here.
"""

#: Up to this many pixels on the shorter side, an image is "small" (CIFAR, Tiny ImageNet, icons).
SMALL_MAX = 64
