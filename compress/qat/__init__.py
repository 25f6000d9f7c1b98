"""GAQAT: gradient-adaptive quantization-aware training (Jiang et al., arXiv 2412.05551).

LSQ fake quantizers (Esser et al., ICLR 2020), SAM/SAGM optimizer wrappers (Foret et al., ICLR
2021; Wang et al., CVPR 2023), the GAQAT conflict/disorder/freezing controller, and a QDQ ONNX
exporter. Only the pydantic config is imported here; torch is imported by the sub-modules on use.
"""

from edgecompress.compress.qat.config import FREEZE_MODES, METHODS, GAQATConfig

__all__ = ["FREEZE_MODES", "METHODS", "GAQATConfig"]
