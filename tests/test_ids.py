"""Ids that touch paths are validated first (schemas/ids.py)."""
import pytest

from schemas.ids import UnsafeId, is_safe_id, safe_id


@pytest.mark.parametrize("good", ["v-0123abcd", "run-20261203-abc", "a", "A.b_c-1", "x" * 128])
def test_safe_ids_pass_unchanged(good):
    assert safe_id(good) == good


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/../b", "a/b", "/abs", ".hidden", "-rf", "a..b", "a\\b", "a*", "v[1]",
                                 "x" * 129, "a\nb", "a b", "é", None, 3])
def test_unsafe_ids_are_refused_with_the_value_named(bad):
    assert not is_safe_id(bad)
    with pytest.raises(UnsafeId, match="run id"):
        safe_id(bad, what="run id")
