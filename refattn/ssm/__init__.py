"""State-space models: S4D (diagonal, ZOH) and Mamba's selective scan.
"""
from .s4d import (S4DState, S4D_METHODS, s4d, s4d_init_state, s4d_kernel, s4d_step,
                  s4d_vjp)
from .selective_scan import (SELECTIVE_SCAN_METHODS, SelectiveScanState, selective_scan,
                             selective_scan_init_state, selective_scan_step,
                             selective_scan_vjp)

__all__ = ["S4DState", "S4D_METHODS", "SELECTIVE_SCAN_METHODS", "SelectiveScanState", "s4d",
           "s4d_init_state", "s4d_kernel", "s4d_step", "selective_scan",
           "selective_scan_init_state", "selective_scan_step", "s4d_vjp",
           "selective_scan_vjp"]
