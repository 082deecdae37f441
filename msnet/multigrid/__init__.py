"""Operators between resolutions (space) and depths (time). No training in here."""

from msnet.multigrid.space import (
    TRANSFERS, galerkin_condition, galerkin_map, get_transfer, prolong_stencil, restrict_stencil,
)

__all__ = ["TRANSFERS", "galerkin_condition", "galerkin_map", "get_transfer", "prolong_stencil", "restrict_stencil"]
