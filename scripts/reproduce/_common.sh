# Sourced by every scripts/reproduce/*.sh: the repository root as working directory, the venv's
# msnet and python (override with MSNET=, PY=), and the size mode from a leading --quick / --full
# (MODE: quick, default or full; the flag is shifted off "$@" by the caller: `shift "$SHIFT"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MSNET=${MSNET:-.venv/bin/msnet}
PY=${PY:-.venv/bin/python}
MODE=default
SHIFT=0
if [[ "${1:-}" == "--quick" || "${1:-}" == "--full" ]]; then MODE=${1#--}; SHIFT=1; fi
