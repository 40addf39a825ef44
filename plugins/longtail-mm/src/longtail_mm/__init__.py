"""longtail-mm: the Maximum-Margin (MM) loss (Kang, Vu, Yoo, ICIP 2021) as a `longtail` loss plugin.

The loss lives in longtail_mm.loss (imported only when the `mm` loss is used, since it needs torch).
"""

__version__ = "0.1.0"
