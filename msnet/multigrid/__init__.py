"""Operators between resolutions (space) and depths (time). No training in here."""

from msnet.multigrid.space import (
    TRANSFERS, galerkin_condition, galerkin_map, get_transfer, prolong_stencil, restrict_stencil,
)

__all__ = ["TRANSFERS", "galerkin_condition", "galerkin_map", "get_transfer", "prolong_stencil", "restrict_stencil"]

from msnet.multigrid.network import gaussian_blur, resample_images, restrict_images, transfer_depth, transfer_resolution
from msnet.multigrid.time import TIME_PROLONGATIONS, TIME_RESTRICTIONS, prolong_in_time, restrict_in_time

__all__ += ["gaussian_blur", "resample_images", "restrict_images", "transfer_depth", "transfer_resolution",
            "TIME_PROLONGATIONS", "TIME_RESTRICTIONS", "prolong_in_time", "restrict_in_time"]

from msnet.multigrid.datafit import STENCIL_TRANSFERS, FitReport, check_stencil_transfer, fit_transfer

__all__ += ["STENCIL_TRANSFERS", "FitReport", "check_stencil_transfer", "fit_transfer"]

from msnet.multigrid.levels import LEVEL_NAMES, data_for_size, level_data, level_name, parse_level

__all__ += ["LEVEL_NAMES", "data_for_size", "level_data", "level_name", "parse_level"]
