"""The context ring: bounded, stable order, never the current document, regions updated in place."""

import pytest

from codefill.lsp.context_ring import ContextRing
from codefill.lsp.prompt import Chunk

DOC = "".join(f"line {i}\n" for i in range(200))


def test_open_documents_give_their_head_and_the_current_one_is_excluded():
    ring = ContextRing(head_lines=3)
    ring.note_open("file:///a.py", "a.py", DOC)
    ring.note_open("file:///b.py", "b.py", "x = 1\n")
    assert ring.chunks(exclude_uri="file:///b.py") == [Chunk("a.py", "line 0\nline 1\nline 2\n")]
    assert [c.path for c in ring.chunks()] == ["a.py", "b.py"]


def test_edits_update_their_region_in_place_keeping_the_order():
    ring = ContextRing(lines_around=2, head_lines=3)
    ring.note_open("file:///a.py", "a.py", DOC)
    ring.note_edit("file:///b.py", "b.py", DOC, line=50)
    ring.note_open("file:///c.py", "c.py", "c = 3\n")
    edited = DOC.replace("line 51\n", "line 51 changed\n")
    ring.note_edit("file:///b.py", "b.py", edited, line=51)
    chunks = ring.chunks()
    assert [c.path for c in chunks] == ["a.py", "b.py", "c.py"]  # b kept its place
    # The merged region (lines 48-53) would exceed the cap of 2*2+1 lines, so it follows the latest edit.
    assert chunks[1].text == "line 49\nline 50\nline 51 changed\nline 52\nline 53\n"


def test_distant_edits_make_separate_regions_and_the_ring_is_bounded():
    ring = ContextRing(max_chunks=3, lines_around=1)
    for n, line in enumerate([10, 50, 90, 130]):
        ring.note_edit("file:///a.py", "a.py", DOC, line=line)
    texts = [c.text for c in ring.chunks()]
    assert len(texts) == 3 and texts[0].startswith("line 49")  # the oldest (line 10) left


def test_eviction_takes_the_least_recently_touched():
    ring = ContextRing(max_chunks=2, lines_around=0)
    ring.note_edit("file:///a.py", "a.py", DOC, line=1)
    ring.note_edit("file:///b.py", "b.py", DOC, line=1)
    ring.note_edit("file:///a.py", "a.py", DOC, line=1)  # touch a again
    ring.note_edit("file:///c.py", "c.py", DOC, line=1)
    assert [c.path for c in ring.chunks()] == ["a.py", "c.py"]


def test_regions_do_not_grow_without_bound():
    ring = ContextRing(lines_around=2, head_lines=5)
    for line in range(0, 100, 3):
        ring.note_edit("file:///a.py", "a.py", DOC, line=line)
    (chunk,) = ring.chunks()
    assert chunk.text.count("\n") <= 5 and "line 99\n" in chunk.text


def test_forget_and_validation():
    ring = ContextRing()
    ring.note_open("file:///a.py", "a.py", DOC)
    ring.forget("file:///a.py")
    assert ring.chunks() == []
    with pytest.raises(ValueError, match="max_chunks must be >= 1, got 0"):
        ContextRing(max_chunks=0)
