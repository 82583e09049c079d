"""Tests of gptlab.clean and the clean stage: reading, normalising, deduplicating, splitting."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line, run_stage, stage_command, write_params
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab import clean
from gptlab.clean import Document, clean_corpus, facts_of, split_documents, tail_cut
from gptlab.clean.dedupe import (
    drop_exact_duplicates,
    drop_near_duplicates,
    fold_words,
    shingle_hashes,
    sorted_unique,
)
from gptlab.clean.documents import Facts, read_documents, read_utf8
from gptlab.clean.leak import LEAK_SHINGLE_WORDS, leak_fraction
from gptlab.clean.normalization import _GUTENBERG_START, normalize, search_line, strip_gutenberg
from gptlab.errors import GptlabError
from gptlab.params import CleanParams
from gptlab.sources import describe_files

# ---------------------------------------------------------------------------------------------
# Real text, embedded so that no test depends on data/ (a DVC output absent in CI): the opening
# of Hamlet in a modern edition and in the First Folio's spelling, and a different play. The
# passages are long enough for word 3-gram containment to mean something.

HAMLET_MODERN = """\
Ber. Who's there?
Fran. Nay, answer me: stand, and unfold yourself.
Ber. Long live the king!
Fran. Bernardo?
Ber. He.
Fran. You come most carefully upon your hour.
Ber. 'Tis now struck twelve. Get thee to bed, Francisco.
Fran. For this relief much thanks: 'tis bitter cold,
And I am sick at heart.

Ber. Have you had quiet guard?
Fran. Not a mouse stirring.
Ber. Well, good night. If you do meet Horatio and Marcellus,
The rivals of my watch, bid them make haste.
Fran. I think I hear them. Stand, ho! Who is there?
Hor. Friends to this ground.
Mar. And liegemen to the Dane.
Fran. Give you good night.
Mar. O, farewell, honest soldier; who hath relieved you?
Fran. Bernardo has my place. Give you good night.

Mar. Holla! Bernardo!
Ber. Say, what, is Horatio there?
Hor. A piece of him.
Ber. Welcome, Horatio: welcome, good Marcellus.
Mar. What, has this thing appeared again tonight?
Ber. I have seen nothing.
Mar. Horatio says 'tis but our fantasy,
And will not let belief take hold of him
Touching this dreaded sight, twice seen of us:
Therefore I have entreated him along
With us to watch the minutes of this night;
That, if again this apparition come,
He may approve our eyes and speak to it.

Hor. Tush, tush, 'twill not appear.
Ber. Sit down awhile,
And let us once again assail your ears,
That are so fortified against our story,
What we two nights have seen.
Hor. Well, sit we down,
And let us hear Bernardo speak of this.
Ber. Last night of all,
When yond same star that's westward from the pole
Had made his course to illume that part of heaven
Where now it burns, Marcellus and myself,
The bell then beating one,
"""

HAMLET_FOLIO = """\
  Barnardo. Who's there?
  Fran. Nay answer me: Stand & vnfold
your selfe

   Bar. Long liue the King

   Fran. Barnardo?
  Bar. He

   Fran. You come most carefully vpon your houre

   Bar. 'Tis now strook twelue, get thee to bed Francisco

   Fran. For this releefe much thankes: 'Tis bitter cold,
And I am sicke at heart

   Barn. Haue you had quiet Guard?
  Fran. Not a Mouse stirring

   Barn. Well, goodnight. If you do meet Horatio and
Marcellus, the Riuals of my Watch, bid them make hast.
Enter Horatio and Marcellus.

  Fran. I thinke I heare them. Stand: who's there?
  Hor. Friends to this ground

   Mar. And Leige-men to the Dane

   Fran. Giue you good night

   Mar. O farwel honest Soldier, who hath relieu'd you?
  Fra. Barnardo ha's my place: giue you goodnight.

  Mar. Holla Barnardo

   Bar. Say, what is Horatio there?
  Hor. A peece of him

   Bar. Welcome Horatio, welcome good Marcellus

   Mar. What, ha's this thing appear'd againe to night

   Bar. I haue seene nothing

   Mar. Horatio saies, 'tis but our Fantasie,
And will not let beleefe take hold of him
Touching this dreaded sight, twice seene of vs,
Therefore I haue intreated him along
With vs, to watch the minutes of this Night,
That if againe this Apparition come,
He may approue our eyes, and speake to it

   Hor. Tush, tush, 'twill not appeare

   Bar. Sit downe a-while,
And let vs once againe assaile your eares,
That are so fortified against our Story,
What we two Nights haue seene

   Hor. Well, sit we downe,
And let vs heare Barnardo speake of this

   Barn. Last night of all,
When yond same Starre that's Westward from the Pole
Had made his course t' illume that part of Heauen
Where now it burnes, Marcellus and my selfe,
The Bell then beating one
"""

MACBETH_MODERN = """\
First Witch. When shall we three meet again?
In thunder, lightning, or in rain?
Second Witch. When the hurlyburly's done,
When the battle's lost and won.
Third Witch. That will be ere the set of sun.
First Witch. Where the place?
Second Witch. Upon the heath.
Third Witch. There to meet with Macbeth.

All. Fair is foul, and foul is fair:
Hover through the fog and filthy air.
Duncan. What bloody man is that? He can report,
As seemeth by his plight, of the revolt
The newest state.
Malcolm. This is the sergeant
Who, like a good and hardy soldier, fought
'Gainst my captivity. Hail, brave friend!
Say to the king the knowledge of the broil
As thou didst leave it.

Soldier. Doubtful it stood;
As two spent swimmers that do cling together
And choke their art. The merciless Macdonwald,
Worthy to be a rebel, for to that
The multiplying villainies of nature
Do swarm upon him, from the Western isles
Of kerns and gallowglasses is supplied;
And fortune, on his damned quarrel smiling,
Show'd like a rebel's whore. But all's too weak;
For brave Macbeth, well he deserves that name,
Disdaining fortune, with his brandish'd steel,
Which smok'd with bloody execution,
Like valour's minion, carv'd out his passage
Till he faced the slave;

And ne'er shook hands, nor bade farewell to him,
Till he unseam'd him from the nave to the chaps,
And fix'd his head upon our battlements.
Duncan. O valiant cousin! worthy gentleman!
Soldier. As whence the sun 'gins his reflection
Shipwrecking storms and direful thunders break,
So from that spring whence comfort seem'd to come
Discomfort swells. Mark, King of Scotland, mark:
No sooner justice had, with valour arm'd,
Compell'd these skipping kerns to trust their heels,
But the Norweyan lord, surveying vantage,
With furbish'd arms and new supplies of men,
Began a fresh assault.
"""

# The same modern text with wider paragraph breaks: equal "up to white space".
HAMLET_COPY = HAMLET_MODERN.replace("\n\n", "\n\n\n")

# A Project Gutenberg header and footer of today's form, with the licence text around them.
GUTENBERG_HEADER = """\
The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.  You may copy it, give it away or
re-use it under the terms of the Project Gutenberg License included
with this eBook or online at www.gutenberg.org


Title: Hamlet

Author: William Shakespeare

Release Date: November 1998 [EBook #1524]
Language: English

Character set encoding: UTF-8

*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***



"""
GUTENBERG_FOOTER = """\



*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524-0.txt or 1524-0.zip *****
This and all associated files of various formats will be found in:
        http://www.gutenberg.org/1/5/2/1524/

Updated editions will replace the previous one--the old editions
will be renamed.

START: FULL LICENSE

THE FULL PROJECT GUTENBERG LICENSE
PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK
"""
# The 1990s form: a "small print" licence ending in this line, and a one-line footer.
OLD_GUTENBERG_HEADER = """\
The Project Gutenberg Etext of Hamlet, by William Shakespeare
**Welcome To The World of Free Plain Vanilla Electronic Texts**

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?  You know: lawyers.
They tell us you might sue us if there is something wrong with
your copy of this etext, even if you got it for free from
someone other than us, and even if what's wrong is not our fault.
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

"""
OLD_GUTENBERG_FOOTER = "\nEnd of Project Gutenberg Etext of Hamlet, by William Shakespeare\n"
# The Moby Shakespeare's notice, repeated between scenes of some Gutenberg texts.
MOBY_NOTICE = """\
<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE
WITH PERMISSION.  ELECTRONIC AND MACHINE READABLE COPIES MAY BE
DISTRIBUTED SO LONG AS SUCH COPIES (1) ARE FOR YOUR OR OTHERS
PERSONAL USE ONLY, AND (2) ARE NOT DISTRIBUTED OR USED
COMMERCIALLY.  PROHIBITED COMMERCIAL DISTRIBUTION INCLUDES BY ANY
SERVICE THAT CHARGES FOR DOWNLOAD TIME OR FOR MEMBERSHIP.>>
"""


# ---------------------------------------------------------------------------------------------
# helpers


def make_params(**overrides) -> CleanParams:
    """Clean params with every step off, so that each test turns on only what it checks."""
    fields = dict(
        strip_boilerplate=False, unicode="none", lowercase=False, collapse_whitespace=False,
        dedupe="none", near_threshold=0.5, min_chars=0, split="documents", val_fraction=0.1,
        split_seed=1337,
    )
    return CleanParams(**(fields | overrides))


def write_raw(raw_dir: Path, files: dict[str, str | bytes]) -> Path:
    """Lay out a raw folder as the download stage does: the files and a manifest.json."""
    entries = []
    for name, content in files.items():
        data = content.encode("utf-8") if isinstance(content, str) else content
        path = raw_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append(
            {"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    manifest = {
        "source": "local", "spec": str(raw_dir), "artifact": None, "sha256": None,
        "include": ["texts/*.txt"], "file_count": len(entries),
        "total_bytes": sum(e["bytes"] for e in entries), "files": entries,
    }
    (raw_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return raw_dir


# A small corpus with one of each case clean_corpus handles: a work in two editions, an exact
# copy of one of them (differing only in white space), a different work, and a short file.
CORPUS = {
    "texts/hamlet_gut.txt": HAMLET_MODERN,
    "texts/hamlet_gut_copy.txt": HAMLET_COPY,
    "texts/hamlet_gut_f.txt": HAMLET_FOLIO,
    "texts/macbeth_gut.txt": MACBETH_MODERN,
    "texts/errata.txt": "Errata: none known.\n",
}
CORPUS_MIN_CHARS = 200
# With this seed and val_fraction the documents split puts the Hamlet copy alone in val, so
# that without deduplication its original sits in train (checked in the test, not assumed).
LEAKY_SEED = 2
LEAKY_VAL_FRACTION = 0.25


def docs(**texts: str) -> list[Document]:
    return [Document(name, text) for name, text in texts.items()]


def facts(documents: list[Document], dedupe: str = "near") -> list[Facts]:
    """What pass 1 keeps of already-cleaned documents."""
    return [facts_of(d, make_params(dedupe=dedupe)) for d in documents]


def names(items: list[Document] | list[Facts]) -> list[str]:
    return [item.name for item in items]


def chars(items: list[Facts]) -> int:
    return sum(item.chars for item in items)


def joined(texts: list[str]) -> str:
    """The in-memory reference of the split files: each text ending in a newline, separated by
    one blank line."""
    return "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)


def jsonl(*texts: str) -> str:
    """A JSON-lines file as the hf download writes it: one {"text": ...} object per line."""
    return "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)


def clean_into(tmp_path: Path, raw: Path, params: CleanParams) -> tuple[dict, dict, str, str]:
    """Run clean_corpus into a fresh folder: its metrics, report, train text and val text."""
    out = tmp_path / "clean"
    out.mkdir()
    result = clean_corpus(raw, params, out)
    train = (out / "train.txt").read_text(encoding="utf-8")
    val = (out / "val.txt").read_text(encoding="utf-8")
    return result.metrics, result.report, train, val


# ---------------------------------------------------------------------------------------------
# read_utf8


def test_read_utf8_returns_the_text(tmp_path: Path) -> None:
    path = tmp_path / "hamlet.txt"
    path.write_bytes("Ophélie: «Adieu»\n".encode())
    assert read_utf8(path) == "Ophélie: «Adieu»\n"


def test_read_utf8_strips_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfTo be, or not to be\n")
    assert read_utf8(path) == "To be, or not to be\n"


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        ("Ophélie".encode("latin-1"), 3),  # a Latin-1 file: é is the single byte 0xE9
        (b"To be, or not to be\n\xff", 20),  # a stray byte at the very end
        (b"caf" + "é".encode()[:1], 3),  # a multi-byte character cut in half
    ],
)
def test_read_utf8_names_the_file_and_the_first_bad_byte(
    tmp_path: Path, data: bytes, offset: int
) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(data)
    with pytest.raises(GptlabError) as caught:
        read_utf8(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"byte offset {offset} " in message


def test_read_utf8_refuses_a_file_with_a_nul_byte(tmp_path: Path) -> None:
    # UTF-16 text is full of NUL bytes: refuse it as binary rather than decode garbage.
    path = tmp_path / "utf16.txt"
    path.write_bytes("Hamlet".encode("utf-16-le"))
    with pytest.raises(GptlabError, match="looks binary") as caught:
        read_utf8(path)
    assert str(path) in str(caught.value)
    assert "offset 1" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# read_documents: plain files and JSON lines


def test_read_documents_gives_a_jsonl_file_one_document_per_line(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", {
        "web/b.jsonl": jsonl("First page.\n", "Ophélie: «Adieu»", ""),
        "a.txt": HAMLET_MODERN,
    })
    documents = list(read_documents(raw))
    assert names(documents) == ["web/b.jsonl:000000001", "web/b.jsonl:000000002",
                                "web/b.jsonl:000000003", "a.txt"]
    assert [d.text for d in documents] == ["First page.\n", "Ophélie: «Adieu»", "",
                                           HAMLET_MODERN]


def test_jsonl_names_sort_in_line_order(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", {"a.jsonl": jsonl(*(f"page {i}" for i in range(12)))})
    documents = list(read_documents(raw))
    assert names(documents) == sorted(names(documents))
    assert [d.text for d in documents] == [f"page {i}" for i in range(12)]


def test_read_documents_by_name(tmp_path: Path) -> None:
    # The download stage lists files in path order ("texts" before "texts-2"), which is not
    # name order ("texts-2/..." before "texts/..."); a JSON-lines file's lines stay together.
    files = {
        "texts/b.txt": "b",
        "texts/a.jsonl": jsonl("a1", "a2"),
        "texts-2/c.txt": "c",
        "texts/a.jsonl.txt": "a.jsonl.txt",
    }
    raw = write_raw(tmp_path / "raw", files)
    assert names(read_documents(raw)) == [
        "texts/b.txt", "texts/a.jsonl:000000001", "texts/a.jsonl:000000002", "texts-2/c.txt",
        "texts/a.jsonl.txt",
    ]
    by_name = names(read_documents(raw, by_name=True))
    assert by_name == sorted(by_name)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"Who's there?", "not a line of JSON"),
        (b"", "not a line of JSON"),
        (b'{"text": "Ophe\xe9lie"}', "not a line of JSON"),  # Latin-1, not UTF-8
        (b'["Who\'s there?"]', '"text" string'),
        (b'{"content": "Who\'s there?"}', '"text" string'),
        (b'{"text": null}', '"text" string'),
    ],
)
def test_read_documents_names_the_file_and_line_of_a_bad_jsonl_line(
    tmp_path: Path, line: bytes, problem: str
) -> None:
    good = jsonl("First page.", "Second page.").encode()
    raw = write_raw(tmp_path / "raw", {"web/a.jsonl": good + line + b"\n"})
    with pytest.raises(GptlabError, match=re.escape(problem)) as caught:
        list(read_documents(raw))
    assert f"{raw / 'web/a.jsonl'}:3: " in str(caught.value)


# ---------------------------------------------------------------------------------------------
# normalize


def test_nfkc_folds_ligatures_and_nfc_keeps_them() -> None:
    text = "\ufb01ne \ufb02ourish"  # "ﬁne ﬂourish" with the fi and fl ligatures
    assert normalize(text, make_params(unicode="NFKC")) == "fine flourish"
    assert normalize(text, make_params(unicode="NFC")) == text
    assert normalize(text, make_params(unicode="none")) == text


def test_nfc_composes_combining_accents() -> None:
    decomposed = "Ophe\u0301lie"  # e + combining acute accent
    composed = "Oph\u00e9lie"
    assert normalize(decomposed, make_params(unicode="NFC")) == composed
    assert normalize(decomposed, make_params(unicode="NFKC")) == composed
    # "none" leaves the text exactly as read.
    assert normalize(decomposed, make_params(unicode="none")) == decomposed


def test_lowercase() -> None:
    text = "Nay, ANSWER me: Stand\n"
    assert normalize(text, make_params(lowercase=True)) == "nay, answer me: stand\n"
    assert normalize(text, make_params(lowercase=False)) == text


def test_collapse_whitespace() -> None:
    text = "Nay,  answer\tme:\t\t stand   \nand unfold  \n\n\n\n\nyourself.\n"
    result = normalize(text, make_params(collapse_whitespace=True))
    assert result == "Nay, answer me: stand\nand unfold\n\nyourself.\n"
    # Off means off: the same text passes through untouched.
    assert normalize(text, make_params(collapse_whitespace=False)) == text


@pytest.mark.parametrize("options", [{}, {"unicode": "NFC"}, {"collapse_whitespace": True}])
def test_line_endings_become_newlines(options: dict) -> None:
    # Windows (CRLF) and old Mac (CR) line endings, whatever else is switched on.
    text = "Who's there?\r\nNay, answer me.\rStand.\n"
    assert normalize(text, make_params(**options)) == "Who's there?\nNay, answer me.\nStand.\n"


def test_normalize_applies_the_gutenberg_stripping_only_when_asked() -> None:
    text = GUTENBERG_HEADER + HAMLET_MODERN + GUTENBERG_FOOTER
    assert normalize(text, make_params(strip_boilerplate=True)) == HAMLET_MODERN
    assert normalize(text, make_params(strip_boilerplate=False)) == text


def test_strip_gutenberg_removes_header_footer_and_licence() -> None:
    stripped = strip_gutenberg(GUTENBERG_HEADER + HAMLET_MODERN + GUTENBERG_FOOTER)
    # Exactly the play remains: nothing of the licence, and no line of the play lost.
    assert stripped == HAMLET_MODERN


def test_strip_gutenberg_handles_the_footer_with_an_end_of_line() -> None:
    # Many texts say "End of the Project Gutenberg EBook of ..." before the *** END marker.
    footer = "\nEnd of the Project Gutenberg EBook of Hamlet, by William Shakespeare\n"
    stripped = strip_gutenberg(GUTENBERG_HEADER + HAMLET_MODERN + footer + GUTENBERG_FOOTER)
    assert stripped == HAMLET_MODERN


def test_strip_gutenberg_removes_the_old_small_print_form() -> None:
    stripped = strip_gutenberg(OLD_GUTENBERG_HEADER + HAMLET_FOLIO + OLD_GUTENBERG_FOOTER)
    assert "SMALL PRINT" not in stripped
    assert "Project Gutenberg" not in stripped
    # The folio text keeps its leading indentation: only blank lines around it go.
    assert stripped == HAMLET_FOLIO


def test_strip_gutenberg_removes_the_moby_notice_between_scenes() -> None:
    act_one, act_two = HAMLET_MODERN.split("\n\nMar. Holla!")
    text = f"{act_one}\n\n{MOBY_NOTICE}\nMar. Holla!{act_two}"
    stripped = strip_gutenberg(GUTENBERG_HEADER + text + GUTENBERG_FOOTER)
    assert "ELECTRONIC VERSION" not in stripped
    assert "<<" not in stripped
    assert ">>" not in stripped
    assert stripped == HAMLET_MODERN


def test_strip_gutenberg_leaves_a_text_without_markers_unchanged() -> None:
    for text in (HAMLET_MODERN, HAMLET_FOLIO, "\n\nno trailing newline", ""):
        assert strip_gutenberg(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "*** START OF THE PROJECT GUTENBERG EBOOK ***\nplay",
        "title\nintro *** START OF THIS PROJECT GUTENBERG EBOOK x *** start of the project "
        "gutenberg again\nplay\n",
        "title\n***\n\n  START OF THE PROJECT GUTENBERG EBOOK\nplay\n",  # the marker spans lines
        "a\nb ***START OF THE PROJECT GUTENBERG\n",
        "a *END*THE SMALL PRINT! b\n*** START OF THE PROJECT GUTENBERG\n",
        "no marker\n",
    ],
)
def test_search_line_finds_what_the_whole_line_pattern_finds(text: str) -> None:
    marker = _GUTENBERG_START
    line = re.compile(rf"^.*({marker.pattern}).*$", re.IGNORECASE | re.MULTILINE)
    found, expected = search_line(marker, text), line.search(text)
    assert (found and found.span()) == (expected and expected.span())


# ---------------------------------------------------------------------------------------------
# exact and near duplicates


def test_exact_duplicates_ignore_white_space_and_keep_the_first_name() -> None:
    documents = facts(docs(
        **{"b.txt": HAMLET_MODERN, "a.txt": HAMLET_COPY, "c.txt": MACBETH_MODERN,
           "d.txt": "  " + HAMLET_MODERN.replace(" ", "\t")}
    ))
    kept, clusters = drop_exact_duplicates(documents)
    assert names(kept) == ["a.txt", "c.txt"]
    assert len(clusters) == 1
    assert clusters[0].kept == "a.txt"
    assert clusters[0].removed == {"b.txt": 1.0, "d.txt": 1.0}
    # The kept document is the one read under that name.
    assert kept[0] is documents[1]


def test_exact_duplicates_keep_texts_that_differ_in_a_word() -> None:
    documents = facts(docs(a=HAMLET_MODERN, b=HAMLET_MODERN.replace("twelve", "eleven")))
    kept, clusters = drop_exact_duplicates(documents)
    assert names(kept) == ["a", "b"]
    assert clusters == []


def test_exact_duplicates_do_not_depend_on_input_order() -> None:
    documents = facts(docs(x=HAMLET_MODERN, y=HAMLET_COPY, z=MACBETH_MODERN))
    forward = drop_exact_duplicates(documents)
    backward = drop_exact_duplicates(documents[::-1])
    assert forward == backward
    assert names(forward[0]) == ["x", "z"]


NEAR_DOCS = {
    "hamlet_gut.txt": HAMLET_MODERN,
    "hamlet_gut_f.txt": HAMLET_FOLIO,
    "macbeth_gut.txt": MACBETH_MODERN,
}


def test_near_duplicates_find_two_editions_of_one_work() -> None:
    kept, clusters = drop_near_duplicates(facts(docs(**NEAR_DOCS)), threshold=0.5)
    # The folio edition is the longer one here, so it is the one kept.
    assert len(HAMLET_FOLIO) > len(HAMLET_MODERN)
    assert names(kept) == ["hamlet_gut_f.txt", "macbeth_gut.txt"]
    assert len(clusters) == 1
    assert clusters[0].kept == "hamlet_gut_f.txt"
    assert list(clusters[0].removed) == ["hamlet_gut.txt"]
    score = clusters[0].removed["hamlet_gut.txt"]
    assert 0.5 <= score <= 1.0


def test_near_duplicates_keep_the_longest_edition() -> None:
    # Make the modern edition the longer one: now it survives instead.
    longer_modern = HAMLET_MODERN + "Mar. Peace, break thee off; look where it comes again!\n" * 3
    kept, clusters = drop_near_duplicates(
        facts(docs(**(NEAR_DOCS | {"hamlet_gut.txt": longer_modern}))), threshold=0.5
    )
    assert names(kept) == ["hamlet_gut.txt", "macbeth_gut.txt"]
    assert clusters[0].kept == "hamlet_gut.txt"
    assert list(clusters[0].removed) == ["hamlet_gut_f.txt"]


def test_near_duplicates_keep_different_works_apart() -> None:
    kept, clusters = drop_near_duplicates(
        facts(docs(hamlet=HAMLET_MODERN, macbeth=MACBETH_MODERN)), threshold=0.5
    )
    assert names(kept) == ["hamlet", "macbeth"]
    assert clusters == []


def test_near_duplicates_respect_the_threshold() -> None:
    # The editions share well under 95% of their 3-grams, so a strict threshold keeps both.
    kept, clusters = drop_near_duplicates(facts(docs(**NEAR_DOCS)), threshold=0.95)
    assert len(kept) == 3
    assert clusters == []


def test_near_duplicates_are_deterministic_and_order_independent() -> None:
    documents = facts(docs(**NEAR_DOCS))
    first = drop_near_duplicates(documents, 0.5)
    assert drop_near_duplicates(documents, 0.5) == first
    assert drop_near_duplicates(documents[::-1], 0.5) == first
    assert drop_near_duplicates([documents[1], documents[2], documents[0]], 0.5) == first


def test_near_duplicates_handle_documents_too_short_for_a_shingle() -> None:
    kept, clusters = drop_near_duplicates(facts(docs(a="Who", b="Who", c="")), 0.5)
    # Nothing to compare: nothing is merged (exact duplicates are the other pass's job).
    assert names(kept) == ["a", "b", "c"]
    assert clusters == []


@pytest.mark.parametrize(
    ("folio", "modern"),
    [
        ("vnfold", "unfold"),
        ("haue", "have"),
        ("selfe", "self"),
        ("liue", "live"),
        ("ioy", "joy"),
        ("Starre", "star"),
        ("Haue you had quiet Guard?", "Have you had quiet guard?"),
    ],
)
def test_fold_words_maps_folio_spelling_onto_modern(folio: str, modern: str) -> None:
    assert fold_words(folio) == fold_words(modern)


def test_fold_words_keeps_different_words_apart() -> None:
    for a, b in [("live", "love"), ("stand", "stay"), ("night", "knight")]:
        assert fold_words(a) != fold_words(b)
    # Punctuation and digits are not words.
    assert fold_words("Act 1. Stand, ho!") == fold_words("act stand ho")


def fold_words_whole_text(text: str) -> list[str]:
    """fold_words as first written, with regular expressions over the whole text."""
    text = re.sub(r"([^\W\d_])\1+", r"\1", text.lower().translate(str.maketrans("vjy", "uii")))
    return re.sub(r"\b(\w\w+)e\b", r"\1", " ".join(re.findall(r"[^\W\d_]+", text))).split()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="aAbeEeevVjJyY \n\t\u3000.,'_-1²éÉΣσςİßſ\u0301", max_size=60))
def test_fold_words_equals_the_whole_text_regexes(text: str) -> None:
    assert fold_words(text) == fold_words_whole_text(text)


def test_sorted_unique_is_numpy_unique() -> None:
    values = np.random.default_rng(0).integers(0, 50, 1000, dtype=np.uint64)
    assert np.array_equal(sorted_unique(values), np.unique(values))
    assert len(sorted_unique(np.zeros(0, dtype=np.uint64))) == 0


# ---------------------------------------------------------------------------------------------
# splitting


def test_a_tail_split_matches_nanogpt_on_tinyshakespeare(tmp_path: Path,
                                                          tinyshakespeare: Path) -> None:
    text = read_utf8(tinyshakespeare)
    raw = write_raw(tmp_path / "raw", {"input.txt": text})
    metrics, _, train, val = clean_into(tmp_path, raw, make_params(split="tail"))
    # nanoGPT's shakespeare_char prepare.py: data[:int(n*0.9)] and data[int(n*0.9):].
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert (metrics["train_chars"], metrics["val_chars"]) == (1_003_854, 111_540)
    assert train + val == text
    assert tail_cut(len(text), 0.1) == len(train)


def test_tail_cut_is_nanogpts_index() -> None:
    assert tail_cut(1000, 0.25) == 750
    assert tail_cut(1001, 0.1) == int(1001 * 0.9)


@pytest.mark.parametrize(("chars", "fraction"), [(1, 0.1), (0, 0.5), (10, 1e-18)])
def test_tail_cut_refuses_an_empty_split(chars: int, fraction: float) -> None:
    with pytest.raises(GptlabError, match=r"clean\.val_fraction"):
        tail_cut(chars, fraction)


def many_docs(count: int = 30) -> list[Facts]:
    """Documents of varied sizes, like plays of different lengths."""
    return facts([Document(f"play_{i:02d}.txt", f"line {i}\n" * (50 + 7 * i))
                  for i in range(count)], dedupe="none")


# Validation documents (indices into many_docs) chosen by split_documents when it still held
# the documents' texts: the split must not change when it sees only names and lengths.
SPLIT_BEFORE_STREAMING = {
    0.1: {0: [3, 10, 17, 18], 1: [1, 16, 26], 2: [3, 17, 22], 3: [21, 26], 4: [6, 18, 24],
          5: [4, 13, 26], 6: [16, 17, 19], 7: [5, 15, 21]},
    0.3: {0: [0, 3, 5, 7, 10, 14, 17, 18, 26, 29], 1: [1, 5, 7, 10, 11, 16, 23, 26, 29],
          2: [0, 3, 4, 7, 14, 15, 16, 17, 22, 25], 3: [1, 5, 6, 9, 10, 12, 14, 21, 22, 26],
          4: [6, 10, 13, 18, 19, 20, 24, 27], 5: [2, 4, 9, 10, 12, 13, 24, 26, 29],
          6: [5, 13, 14, 16, 17, 19, 22, 27], 7: [0, 3, 5, 7, 9, 13, 15, 21, 28, 29]},
}


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_split_documents_is_the_split_of_before_streaming(fraction: float) -> None:
    documents = many_docs()
    for seed, expected in SPLIT_BEFORE_STREAMING[fraction].items():
        _, val = split_documents(documents, fraction, seed)
        assert names(val) == [documents[i].name for i in expected]


def test_split_documents_is_deterministic_from_the_seed() -> None:
    documents = many_docs()
    first = split_documents(documents, 0.1, seed=1337)
    assert split_documents(documents, 0.1, seed=1337) == first
    # The input order does not matter either: the shuffle starts from the sorted names.
    assert split_documents(documents[::-1], 0.1, seed=1337) == first
    # A different seed picks different documents (checked over a few seeds, since any two
    # seeds could by chance agree).
    others = {tuple(names(split_documents(documents, 0.1, seed)[1])) for seed in range(5)}
    assert len(others) > 1


def test_split_documents_moves_whole_documents() -> None:
    documents = many_docs()
    train, val = split_documents(documents, 0.1, seed=7)
    assert train and val
    assert sorted(names(train) + names(val)) == sorted(names(documents))
    assert not set(names(train)) & set(names(val))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
def test_split_documents_gives_val_about_its_share(seed: int, fraction: float) -> None:
    documents = many_docs()
    _, val = split_documents(documents, fraction, seed)
    share = chars(val) / chars(documents)
    # Whole documents cannot hit the target exactly: allow about half the largest document
    # (which is under 6% of the corpus).
    assert abs(share - fraction) < 0.03


def test_split_documents_does_not_put_a_huge_document_in_val() -> None:
    # One long work and nine short ones: val should be a few short ones, never the long one,
    # whatever the seed (seed 18 shuffles the long one first).
    documents = facts([Document("big.txt", "x\n" * 4500)]
                      + [Document(f"small_{i}.txt", "y\n" * 50) for i in range(9)])
    target = 0.1 * chars(documents)
    for seed in range(50):
        _, val = split_documents(documents, 0.1, seed)
        assert chars(val) < 2 * target, f"seed {seed}: val is {names(val)}"


@pytest.mark.parametrize("count", [0, 1])
def test_split_documents_needs_two_documents(count: int) -> None:
    with pytest.raises(GptlabError, match=r"clean\.split"):
        split_documents(many_docs(count), 0.1, seed=0)


def test_split_documents_always_leaves_train_something() -> None:
    # A val_fraction near 1 could want every document: one must stay for training.
    train, val = split_documents(many_docs(3), 0.99, seed=0)
    assert len(train) == 1
    assert len(val) == 2


# ---------------------------------------------------------------------------------------------
# the leak check


def leak(train: str, val: str, **options: int) -> float:
    return leak_fraction(io.StringIO(train), io.StringIO(val), **options)


def leak_of_whole_texts(train: str, val: str) -> float:
    """The leak fraction as first computed: every shingle of both whole texts at once."""
    val_hashes = shingle_hashes(fold_words(val), LEAK_SHINGLE_WORDS)
    if len(val_hashes) == 0:
        return 0.0
    train_hashes = shingle_hashes(fold_words(train), LEAK_SHINGLE_WORDS)
    return len(np.intersect1d(val_hashes, train_hashes, assume_unique=True)) / len(val_hashes)


def test_leak_fraction() -> None:
    assert leak(HAMLET_MODERN, MACBETH_MODERN) == 0.0
    assert leak(HAMLET_MODERN, HAMLET_MODERN) == 1.0
    # Case and white space do not hide a copy.
    assert leak(HAMLET_MODERN, HAMLET_COPY.upper()) == 1.0
    # Half of val copied from train, half new: the fraction is strictly between.
    half = leak(HAMLET_MODERN, HAMLET_MODERN[:800] + "\n" + MACBETH_MODERN[:800])
    assert 0.2 < half < 0.8
    # Too short for a single 13-word shingle: nothing can leak.
    assert leak(HAMLET_MODERN, "Who's there?") == 0.0


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 1000, 1 << 19])
def test_leak_fraction_in_chunks_equals_the_whole_text_formula(chunk_chars: int) -> None:
    train = HAMLET_MODERN + HAMLET_FOLIO[:900]
    val = HAMLET_MODERN[1200:] + "\n" + HAMLET_FOLIO[700:] + MACBETH_MODERN
    expected = leak_of_whole_texts(train, val)
    assert 0.1 < expected < 0.9
    assert leak(train, val, chunk_chars=chunk_chars) == expected


LEAK_WORDS = ["Who's", "there", "nay", "answer", "me", "stand", "and", "unfold", "yourself"]


@settings(max_examples=100, deadline=None)
@given(
    words=st.lists(st.sampled_from(LEAK_WORDS), max_size=120),
    separators=st.lists(st.sampled_from([" ", "\n", ", ", "\n\n", ". ", "  "]), min_size=1),
    val_start=st.integers(0, 120),
    chunk_chars=st.integers(1, 200),
)
def test_leak_fraction_equals_the_whole_text_formula(
    words: list[str], separators: list[str], val_start: int, chunk_chars: int
) -> None:
    text = "".join(w + separators[i % len(separators)] for i, w in enumerate(words))
    train, val = text[: len(text) * 2 // 3], text[val_start:]
    assert leak(train, val, chunk_chars=chunk_chars) == leak_of_whole_texts(train, val)


def test_leak_fraction_of_a_large_val_is_measured_on_a_sample() -> None:
    rng = np.random.default_rng(0)
    words = [f"w{'abcdefghij'[i % 10]}{'klmnopqrst'[i // 10]}" for i in rng.integers(0, 100, 3000)]
    train, val = " ".join(words[:2000]), " ".join(words[1000:])  # half of val leaks
    exact = leak(train, val)
    assert 0.4 < exact < 0.6
    sampled = leak(train, val, max_val_shingles=200, chunk_chars=500)
    # The sample is the val shingles with the 200 smallest hashes, checked exactly.
    sample = shingle_hashes(fold_words(val), LEAK_SHINGLE_WORDS)[:200]
    train_hashes = shingle_hashes(fold_words(train), LEAK_SHINGLE_WORDS)
    assert sampled == np.isin(sample, train_hashes).mean()
    assert abs(sampled - exact) < 0.15


# ---------------------------------------------------------------------------------------------
# clean_corpus


@pytest.mark.parametrize(
    ("dedupe", "exact", "near", "kept"),
    [("none", 0, 0, 4), ("exact", 1, 0, 3), ("near", 1, 1, 2)],
)
def test_clean_corpus_metrics(
    tmp_path: Path, dedupe: str, exact: int, near: int, kept: int
) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    params = make_params(dedupe=dedupe, min_chars=CORPUS_MIN_CHARS)
    metrics, report, train, val = clean_into(tmp_path, raw, params)
    assert metrics == {
        "docs_in": 5,
        "docs_short": 1,
        "docs_exact_duplicates": exact,
        "docs_near_duplicates": near,
        "docs_kept": kept,
        "near_clusters": near,
        "train_docs": metrics["train_docs"],
        "val_docs": metrics["val_docs"],
        "train_chars": len(train),
        "val_chars": len(val),
        "leak_fraction": metrics["leak_fraction"],
    }
    assert metrics["train_docs"] + metrics["val_docs"] == kept
    assert metrics["train_docs"] >= 1
    assert metrics["val_docs"] >= 1
    assert report["short"] == ["texts/errata.txt"]
    assert sorted(report["train"] + report["val"]) == sorted(
        set(CORPUS) - {"texts/errata.txt"}
        - {n for c in report["exact_duplicates"] for n in c["removed"]}
        - {n for c in report["near_duplicates"] for n in c["removed"]}
    )
    # The split texts are the kept documents joined, in name order.
    assert report["val"] == sorted(report["val"])
    assert val == joined([CORPUS[n] for n in report["val"]])
    assert train == joined([CORPUS[n] for n in report["train"]])
    assert isinstance(metrics["leak_fraction"], float)


def test_clean_corpus_reports_the_clusters(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    report = clean_into(tmp_path, raw, make_params(dedupe="near", min_chars=CORPUS_MIN_CHARS))[1]
    assert report["exact_duplicates"] == [
        {"kept": "texts/hamlet_gut.txt", "removed": {"texts/hamlet_gut_copy.txt": 1.0}}
    ]
    [cluster] = report["near_duplicates"]
    assert cluster["kept"] == "texts/hamlet_gut_f.txt"
    assert list(cluster["removed"]) == ["texts/hamlet_gut.txt"]
    assert cluster["removed"]["texts/hamlet_gut.txt"] >= 0.5
    # The report is what the stage writes as JSON: it must serialise; nothing was cut.
    json.dumps(report)
    assert "truncated" not in report


def test_clean_corpus_caps_the_lists_of_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clean, "REPORT_MAX_ITEMS", 2)
    pages = [f"Page {i}: " + MACBETH_MODERN[i * 40 :] for i in range(6)]
    raw = write_raw(tmp_path / "raw", {"web.jsonl": jsonl(*pages, "short", "short too")})
    metrics, report, _, _ = clean_into(tmp_path, raw, make_params(min_chars=100, val_fraction=0.3))
    assert (metrics["train_docs"], metrics["val_docs"]) == (4, 2)
    assert report["train"] == [f"web.jsonl:{i:09d}" for i in range(1, 7)
                               if f"web.jsonl:{i:09d}" not in report["val"]][:2]
    assert len(report["short"]) == 2
    assert report["truncated"] == {"train": 4}


@pytest.mark.parametrize("dedupe", ["none", "exact", "near"])
def test_deduplication_stops_a_copy_leaking_into_val(tmp_path: Path, dedupe: str) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    params = make_params(dedupe=dedupe, min_chars=CORPUS_MIN_CHARS,
                         val_fraction=LEAKY_VAL_FRACTION, split_seed=LEAKY_SEED)
    metrics, report, _, _ = clean_into(tmp_path, raw, params)
    leak = metrics["leak_fraction"]
    if dedupe == "none":
        # The premise of the check: one copy in each split, so all of val leaks.
        copies = {"texts/hamlet_gut.txt", "texts/hamlet_gut_copy.txt"}
        assert copies & set(report["val"])
        assert copies & set(report["train"])
        assert leak == 1.0
    elif dedupe == "exact":
        # The copy is gone, but the other edition of Hamlet still shares some 13-word runs.
        assert 0.0 <= leak < 0.5
    else:
        # One edition per work: val and train share nothing.
        assert leak == 0.0


def test_clean_corpus_drops_short_documents(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    # The folio's length: the shorter modern Hamlet and its copy go, the folio itself stays.
    threshold = len(HAMLET_FOLIO)
    assert len(HAMLET_COPY) < threshold <= len(MACBETH_MODERN)
    metrics, report, train, val = clean_into(tmp_path, raw, make_params(min_chars=threshold))
    assert metrics["docs_short"] == 3
    assert report["short"] == ["texts/errata.txt", "texts/hamlet_gut.txt",
                               "texts/hamlet_gut_copy.txt"]
    assert metrics["docs_kept"] == 2
    assert "Ber. Who's there?" not in train + val


def test_clean_corpus_min_chars_counts_the_cleaned_text(tmp_path: Path) -> None:
    # A long licence around a one-line text: long as read, short once stripped.
    body = "Who's there? Nay, answer me: stand, and unfold yourself.\n"
    raw = write_raw(tmp_path / "raw", {
        "a.txt": GUTENBERG_HEADER + body + GUTENBERG_FOOTER,
        "b.txt": HAMLET_MODERN,
        "c.txt": MACBETH_MODERN,
    })
    report = clean_into(tmp_path, raw, make_params(strip_boilerplate=True, min_chars=200))[1]
    assert report["short"] == ["a.txt"]


def test_clean_corpus_refuses_when_everything_is_dropped(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    with pytest.raises(GptlabError, match=r"clean\.min_chars") as caught:
        clean_corpus(raw, make_params(min_chars=1_000_000), tmp_path)
    assert str(raw) in str(caught.value)


def test_clean_corpus_tail_split(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    metrics, _, train, val = clean_into(
        tmp_path, raw, make_params(split="tail", dedupe="near", min_chars=CORPUS_MIN_CHARS)
    )
    assert train + val == joined([HAMLET_FOLIO, MACBETH_MODERN])
    assert (metrics["train_chars"], metrics["val_chars"]) == (len(train), len(val))


# Documents of every kind the writer joins: plain files and JSON lines, texts with and without a
# final newline, an exact copy, two editions of one work, and short ones.
MIXED_CORPUS = {
    "texts/hamlet_gut.txt": HAMLET_MODERN,
    "texts/macbeth_gut.txt": MACBETH_MODERN.rstrip("\n"),
    "web/pages.jsonl": jsonl(HAMLET_FOLIO, "too short", MACBETH_MODERN[:700], HAMLET_COPY,
                             MACBETH_MODERN[300:] + "\n\n", "Ophélie: «Adieu» " * 40),
    "texts-2/errata.txt": "Errata: none known.",
}


@pytest.mark.parametrize("dedupe", ["none", "exact", "near"])
@pytest.mark.parametrize("split", ["tail", "documents"])
def test_streamed_splits_equal_the_splits_of_the_joined_texts(
    tmp_path: Path, dedupe: str, split: str
) -> None:
    raw = write_raw(tmp_path / "raw", MIXED_CORPUS)
    params = make_params(dedupe=dedupe, split=split, min_chars=100, val_fraction=0.3)
    metrics, report, train, val = clean_into(tmp_path, raw, params)
    assert report["short"] == ["texts-2/errata.txt", "web/pages.jsonl:000000002"]
    removed = {n for key in ("exact_duplicates", "near_duplicates")
               for cluster in report[key] for n in cluster["removed"]}
    assert len(removed) == metrics["docs_exact_duplicates"] + metrics["docs_near_duplicates"]
    # The in-memory reference: every document held at once, the kept ones joined in name order
    # (in the manifest's order for a tail split without dedupe).
    in_order = list(read_documents(raw, by_name=dedupe != "none" or split != "tail"))
    kept = [d for d in in_order if d.name not in removed | set(report["short"])]
    if split == "tail":
        assert report["train"] == names(kept)
        text = joined([d.text for d in kept])
        cut = int(len(text) * (1 - 0.3))
        assert (train, val) == (text[:cut], text[cut:])
    else:
        assert report["train"] and report["val"]
        assert sorted(report["train"] + report["val"]) == names(kept)
        assert train == joined([d.text for d in kept if d.name in report["train"]])
        assert val == joined([d.text for d in kept if d.name in report["val"]])
    assert (metrics["train_chars"], metrics["val_chars"]) == (len(train), len(val))
    assert metrics["leak_fraction"] == round(leak_of_whole_texts(train, val), 6)


def test_clean_corpus_tail_split_without_dedupe_keeps_the_manifest_order(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", {"b.txt": HAMLET_MODERN, "a.txt": MACBETH_MODERN})
    _, report, train, val = clean_into(tmp_path, raw, make_params(split="tail"))
    assert report["train"] == ["b.txt", "a.txt"]
    assert train + val == joined([HAMLET_MODERN, MACBETH_MODERN])


def test_clean_corpus_refuses_names_out_of_order(tmp_path: Path) -> None:
    # A file named like a line of a JSON-lines file sorts among that file's documents.
    raw = write_raw(tmp_path / "raw", {"a.jsonl": jsonl("one", "two", "three"),
                                       "a.jsonl:000000002": "impostor"})
    message = "a.jsonl:000000002 is read after a.jsonl:000000003"
    with pytest.raises(GptlabError, match=re.escape(message)):
        clean_corpus(raw, make_params(), tmp_path)


def test_clean_corpus_notices_a_file_changed_between_its_two_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = write_raw(tmp_path / "raw", {"a.txt": HAMLET_MODERN, "b.txt": MACBETH_MODERN})
    read_facts = clean.read_facts

    def read_facts_then_edit(*args):
        facts = read_facts(*args)
        (raw / "a.txt").write_text(HAMLET_FOLIO, encoding="utf-8")
        return facts

    monkeypatch.setattr(clean, "read_facts", read_facts_then_edit)
    with pytest.raises(GptlabError, match=r"a\.txt changed while the clean stage read it twice"):
        clean_corpus(raw, make_params(), tmp_path)


def test_clean_corpus_normalises_before_deduplicating(tmp_path: Path) -> None:
    # The same text with and without a Gutenberg wrapper is one document once stripped.
    raw = write_raw(tmp_path / "raw", {
        "a.txt": GUTENBERG_HEADER + HAMLET_MODERN + GUTENBERG_FOOTER,
        "b.txt": HAMLET_MODERN,
        "c.txt": MACBETH_MODERN,
    })
    metrics, _, train, val = clean_into(
        tmp_path, raw, make_params(strip_boilerplate=True, dedupe="exact")
    )
    assert metrics["docs_exact_duplicates"] == 1
    assert "Project Gutenberg" not in train + val


def test_clean_corpus_needs_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(GptlabError, match="not found"):
        clean_corpus(tmp_path / "raw", make_params(), tmp_path)
    (tmp_path / "raw" / "manifest.json").write_text('{"files": [{"name": "a.txt"}]}')
    with pytest.raises(GptlabError, match="not a download manifest"):
        clean_corpus(tmp_path / "raw", make_params(), tmp_path)


def test_nfkc_then_lowercase_applies_to_the_corpus(tmp_path: Path) -> None:
    ligatured = HAMLET_MODERN.replace("fi", "\ufb01")
    raw = write_raw(tmp_path / "raw", {"a.txt": ligatured, "b.txt": MACBETH_MODERN})
    _, _, train, val = clean_into(
        tmp_path, raw, make_params(unicode="NFKC", lowercase=True, split="tail")
    )
    text = train + val
    assert "\ufb01" not in text
    assert text == text.lower()
    assert unicodedata.is_normalized("NFKC", text)


# ---------------------------------------------------------------------------------------------
# the clean stage


def test_clean_stage_writes_its_outputs(tmp_path: Path, params_for) -> None:
    write_raw(tmp_path / "data" / "raw", CORPUS)
    write_params(tmp_path, params_for({"clean.min_chars": CORPUS_MIN_CHARS}))
    result = run_stage("clean", tmp_path)
    assert result.returncode == 0, result.stderr
    clean_dir = tmp_path / "data" / "clean"
    assert sorted(p.name for p in clean_dir.iterdir()) == ["report.json", "train.txt", "val.txt"]
    train = (clean_dir / "train.txt").read_text(encoding="utf-8")
    val = (clean_dir / "val.txt").read_text(encoding="utf-8")
    report = json.loads((clean_dir / "report.json").read_text(encoding="utf-8"))
    metrics = json.loads((tmp_path / "metrics" / "clean.json").read_text(encoding="utf-8"))
    # The project's defaults dedupe near: one Hamlet and Macbeth remain, one in each split.
    assert metrics["docs_kept"] == 2
    assert metrics["train_chars"] == len(train)
    assert metrics["val_chars"] == len(val)
    assert metrics["leak_fraction"] == 0.0
    assert sorted(report["train"] + report["val"]) == ["texts/hamlet_gut_f.txt",
                                                       "texts/macbeth_gut.txt"]
    assert {train, val} == {HAMLET_FOLIO, MACBETH_MODERN}
    # No staging folders left behind by the atomic swap.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["clean", "raw"]


def test_clean_stage_refuses_invalid_utf8_in_one_line(tmp_path: Path, params_for) -> None:
    bad = "Ophélie: «Adieu»\n".encode("latin-1")
    write_raw(tmp_path / "data" / "raw", CORPUS | {"texts/ophelia.txt": bad})
    write_params(tmp_path, params_for({"clean.min_chars": CORPUS_MIN_CHARS}))
    line = one_error_line(run_stage("clean", tmp_path))
    assert "texts/ophelia.txt" in line and "byte offset 3" in line
    assert not (tmp_path / "data" / "clean").exists()
    assert not (tmp_path / "metrics" / "clean.json").exists()


def test_clean_stage_refuses_a_bad_jsonl_line_in_one_line(tmp_path: Path, params_for) -> None:
    pages = jsonl(HAMLET_MODERN, MACBETH_MODERN) + '{"title": "Hamlet"}\n'
    write_raw(tmp_path / "data" / "raw", {"web/pages.jsonl": pages})
    write_params(tmp_path, params_for())
    line = one_error_line(run_stage("clean", tmp_path))
    assert "web/pages.jsonl:3: " in line and '"text" string' in line
    # Nothing half-written is left: no clean folder, no staging folder, no metrics.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]
    assert not (tmp_path / "metrics" / "clean.json").exists()


def test_clean_stage_refuses_an_empty_corpus_in_one_line(tmp_path: Path, params_for) -> None:
    write_raw(tmp_path / "data" / "raw", {"empty.txt": "", "blank.txt": "\n\n"})
    write_params(tmp_path, params_for())
    line = one_error_line(run_stage("clean", tmp_path))
    assert "clean.min_chars=500" in line and "2 read" in line
    assert not (tmp_path / "data" / "clean").exists()


def write_large_jsonl(path: Path, megabytes: int, seed: int = 0) -> int:
    """A JSON-lines corpus of ~8 KB documents of random words (some ending a line); returns its
    number of documents. Built from fixed 8-byte words so numpy writes it in a second."""
    rng = np.random.default_rng(seed)
    letters = rng.integers(ord("a"), ord("z") + 1, size=(4096, 7), dtype=np.uint8)
    words = np.concatenate([letters, np.full((4096, 1), ord(" "), np.uint8)], axis=1)
    words[::16, 6:] = np.frombuffer(b"\\n", np.uint8)  # JSON's escaped newline
    words_per_document = 1000
    count = megabytes * 1_000_000 // (words_per_document * 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for start in range(0, count, 1000):
            block = words[rng.integers(0, 4096, (min(1000, count - start), words_per_document))]
            for document in block.reshape(len(block), -1):
                out.write(b'{"text": "' + document.tobytes() + b'"}\n')
    return count


# Runs the stage given as argument in this process and prints the peak resident memory of the
# interpreter with the stage's imports done, then of the whole run, in KiB. VmHWM starts afresh
# in a new program; ru_maxrss would not (Linux keeps it across exec, from the forking parent).
PEAK_MEMORY_OF = """
import runpy, sys
import gptlab.clean, gptlab.errors, gptlab.io, gptlab.params

def peak_kib():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmHWM:")[1].split()[0])

baseline = peak_kib()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print(baseline, peak_kib())
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_clean_stage_memory_does_not_grow_with_the_corpus(tmp_path: Path, params_for) -> None:
    raw = tmp_path / "data" / "raw"
    count = write_large_jsonl(raw / "web" / "pages.jsonl", megabytes=150)
    manifest = describe_files(raw)
    (raw / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    # Boilerplate stripping only costs time here: this corpus has none.
    write_params(tmp_path, params_for({"clean.dedupe": "exact", "clean.split": "documents",
                                       "clean.strip_boilerplate": False}))
    _, *stage = stage_command("clean")
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_OF, *stage],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    baseline_kib, peak_kib = map(int, result.stdout.split("\n")[-2].split())
    metrics = json.loads((tmp_path / "metrics" / "clean.json").read_text(encoding="utf-8"))
    shutil.rmtree(tmp_path / "data")  # 300 MB that pytest would otherwise keep for a while
    assert metrics["docs_in"] == metrics["docs_kept"] == count
    assert metrics["train_chars"] + metrics["val_chars"] > 0.9 * manifest["total_bytes"]
    # Holding the corpus takes many times its size (the clean stage before streaming: 2.8 GB);
    # streaming needs the documents' facts, a bounded leak-check sample and one chunk of text.
    grown = (peak_kib - baseline_kib) * 1024
    assert grown < 0.4 * manifest["total_bytes"], f"{grown / 1e6:.0f} MB above the baseline"
