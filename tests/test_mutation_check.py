"""scripts/mutation_check.py: its list of planted bugs still applies to this tree. Nothing runs mutated here."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_to_this_tree():
    """Each original text occurs exactly once in its file and each named test exists: when code moves,
    this fails and names the mutation to update, instead of the list silently planting nothing."""
    mc = load_script()
    assert len(mc.MUTATIONS) >= 12
    assert mc.problems(mc.MUTATIONS, ROOT) == []
    covered = {m.path for m in mc.MUTATIONS}
    for core in ("msnet/multigrid/space.py", "msnet/multigrid/network.py", "msnet/multigrid/time.py",
                 "msnet/multigrid/datafit.py", "msnet/core/integrators.py", "msnet/core/multistep.py",
                 "msnet/core/reversible.py"):
        assert core in covered, core


def test_a_stale_mutation_is_named():
    mc = load_script()
    m = mc.MUTATIONS[0]
    test_file = m.tests[0].split("::")[0]
    stale = [
        dataclasses.replace(m, name="moved", original="text that is not there"),
        dataclasses.replace(m, name="no-file", path="msnet/nowhere.py"),
        dataclasses.replace(m, name="no-test", tests=(f"{test_file}::test_that_does_not_exist",)),
        dataclasses.replace(m, name="no-test-file", tests=("tests/test_nowhere.py",)),
        dataclasses.replace(m, name="no-op", replacement=m.original),
    ]
    found = mc.problems(stale, ROOT)
    for name in ("moved", "no-file", "no-test", "no-test-file", "no-op"):
        assert any(line.startswith(name + ":") for line in found), (name, found)
    assert mc.main(["-k", "no mutation is called this"]) == 1
