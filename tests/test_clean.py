"""Tests of gptlab.clean and the clean stage: reading, normalising, deduplicating, splitting."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import pytest
from conftest import one_error_line, run_stage, write_params

from gptlab.clean import (
    Document,
    clean_corpus,
    drop_exact_duplicates,
    drop_near_duplicates,
    fold_words,
    join_documents,
    leak_fraction,
    normalize,
    read_utf8,
    split_documents,
    split_tail,
    strip_gutenberg,
)
from gptlab.errors import GptlabError
from gptlab.params import CleanParams

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


def names(documents: list[Document]) -> list[str]:
    return [d.name for d in documents]


def chars(documents: list[Document]) -> int:
    return sum(len(d.text) for d in documents)


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


# ---------------------------------------------------------------------------------------------
# exact and near duplicates


def test_exact_duplicates_ignore_white_space_and_keep_the_first_name() -> None:
    documents = docs(
        **{"b.txt": HAMLET_MODERN, "a.txt": HAMLET_COPY, "c.txt": MACBETH_MODERN,
           "d.txt": "  " + HAMLET_MODERN.replace(" ", "\t")}
    )
    kept, clusters = drop_exact_duplicates(documents)
    assert names(kept) == ["a.txt", "c.txt"]
    assert len(clusters) == 1
    assert clusters[0].kept == "a.txt"
    assert clusters[0].removed == {"b.txt": 1.0, "d.txt": 1.0}
    # The kept document is returned as it was, not in its white-space-normalised form.
    assert kept[0].text == HAMLET_COPY


def test_exact_duplicates_keep_texts_that_differ_in_a_word() -> None:
    documents = docs(a=HAMLET_MODERN, b=HAMLET_MODERN.replace("twelve", "eleven"))
    kept, clusters = drop_exact_duplicates(documents)
    assert names(kept) == ["a", "b"]
    assert clusters == []


def test_exact_duplicates_do_not_depend_on_input_order() -> None:
    documents = docs(x=HAMLET_MODERN, y=HAMLET_COPY, z=MACBETH_MODERN)
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
    kept, clusters = drop_near_duplicates(docs(**NEAR_DOCS), threshold=0.5)
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
        docs(**(NEAR_DOCS | {"hamlet_gut.txt": longer_modern})), threshold=0.5
    )
    assert names(kept) == ["hamlet_gut.txt", "macbeth_gut.txt"]
    assert clusters[0].kept == "hamlet_gut.txt"
    assert list(clusters[0].removed) == ["hamlet_gut_f.txt"]


def test_near_duplicates_keep_different_works_apart() -> None:
    kept, clusters = drop_near_duplicates(
        docs(hamlet=HAMLET_MODERN, macbeth=MACBETH_MODERN), threshold=0.5
    )
    assert names(kept) == ["hamlet", "macbeth"]
    assert clusters == []


def test_near_duplicates_respect_the_threshold() -> None:
    # The editions share well under 95% of their 3-grams, so a strict threshold keeps both.
    kept, clusters = drop_near_duplicates(docs(**NEAR_DOCS), threshold=0.95)
    assert len(kept) == 3
    assert clusters == []


def test_near_duplicates_are_deterministic_and_order_independent() -> None:
    documents = docs(**NEAR_DOCS)
    first = drop_near_duplicates(documents, 0.5)
    assert drop_near_duplicates(documents, 0.5) == first
    assert drop_near_duplicates(documents[::-1], 0.5) == first
    assert drop_near_duplicates([documents[1], documents[2], documents[0]], 0.5) == first


def test_near_duplicates_handle_documents_too_short_for_a_shingle() -> None:
    kept, clusters = drop_near_duplicates(docs(a="Who", b="Who", c=""), 0.5)
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


# ---------------------------------------------------------------------------------------------
# splitting and the leak check


def test_split_tail_matches_nanogpt_on_tinyshakespeare(tinyshakespeare: Path) -> None:
    text = read_utf8(tinyshakespeare)
    train, val = split_tail(text, 0.1)
    # nanoGPT's shakespeare_char prepare.py: data[:int(n*0.9)] and data[int(n*0.9):].
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert train + val == text


def test_split_tail_keeps_every_character() -> None:
    text = HAMLET_MODERN
    train, val = split_tail(text, 0.25)
    assert train + val == text
    assert len(train) == int(len(text) * 0.75)


@pytest.mark.parametrize(("text", "fraction"), [("a", 0.1), ("", 0.5), ("abcdefghij", 1e-18)])
def test_split_tail_refuses_an_empty_split(text: str, fraction: float) -> None:
    with pytest.raises(GptlabError, match=r"clean\.val_fraction"):
        split_tail(text, fraction)


def many_docs(count: int = 30) -> list[Document]:
    """Documents of varied sizes, like plays of different lengths."""
    return [Document(f"play_{i:02d}.txt", f"line {i}\n" * (50 + 7 * i)) for i in range(count)]


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
    by_name = {d.name: d.text for d in documents}
    assert all(d.text == by_name[d.name] for d in train + val)


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
    documents = [Document("big.txt", "x\n" * 4500)]
    documents += [Document(f"small_{i}.txt", "y\n" * 50) for i in range(9)]
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


def test_leak_fraction() -> None:
    assert leak_fraction(HAMLET_MODERN, MACBETH_MODERN) == 0.0
    assert leak_fraction(HAMLET_MODERN, HAMLET_MODERN) == 1.0
    # Case and white space do not hide a copy.
    assert leak_fraction(HAMLET_MODERN, HAMLET_COPY.upper()) == 1.0
    # Half of val copied from train, half new: the fraction is strictly between.
    half = leak_fraction(HAMLET_MODERN, HAMLET_MODERN[:800] + "\n" + MACBETH_MODERN[:800])
    assert 0.2 < half < 0.8
    # Too short for a single 13-word shingle: nothing can leak.
    assert leak_fraction(HAMLET_MODERN, "Who's there?") == 0.0


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
    result = clean_corpus(raw, params)
    metrics = result.metrics
    assert metrics == {
        "docs_in": 5,
        "docs_short": 1,
        "docs_exact_duplicates": exact,
        "docs_near_duplicates": near,
        "docs_kept": kept,
        "near_clusters": near,
        "train_docs": metrics["train_docs"],
        "val_docs": metrics["val_docs"],
        "train_chars": len(result.train_text),
        "val_chars": len(result.val_text),
        "leak_fraction": metrics["leak_fraction"],
    }
    assert metrics["train_docs"] + metrics["val_docs"] == kept
    assert metrics["train_docs"] >= 1
    assert metrics["val_docs"] >= 1
    assert result.report["short"] == ["texts/errata.txt"]
    assert sorted(result.report["train"] + result.report["val"]) == sorted(
        set(CORPUS) - {"texts/errata.txt"}
        - {n for c in result.report["exact_duplicates"] for n in c["removed"]}
        - {n for c in result.report["near_duplicates"] for n in c["removed"]}
    )
    # The split texts are the kept documents joined, in name order.
    expected_val = join_documents([Document(n, CORPUS[n]) for n in result.report["val"]])
    assert result.val_text == expected_val
    assert isinstance(metrics["leak_fraction"], float)


def test_clean_corpus_reports_the_clusters(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    report = clean_corpus(raw, make_params(dedupe="near", min_chars=CORPUS_MIN_CHARS)).report
    assert report["exact_duplicates"] == [
        {"kept": "texts/hamlet_gut.txt", "removed": {"texts/hamlet_gut_copy.txt": 1.0}}
    ]
    [cluster] = report["near_duplicates"]
    assert cluster["kept"] == "texts/hamlet_gut_f.txt"
    assert list(cluster["removed"]) == ["texts/hamlet_gut.txt"]
    assert cluster["removed"]["texts/hamlet_gut.txt"] >= 0.5
    # The report is what the stage writes as JSON: it must serialise.
    json.dumps(report)


@pytest.mark.parametrize("dedupe", ["none", "exact", "near"])
def test_deduplication_stops_a_copy_leaking_into_val(tmp_path: Path, dedupe: str) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    params = make_params(dedupe=dedupe, min_chars=CORPUS_MIN_CHARS,
                         val_fraction=LEAKY_VAL_FRACTION, split_seed=LEAKY_SEED)
    result = clean_corpus(raw, params)
    leak = result.metrics["leak_fraction"]
    if dedupe == "none":
        # The premise of the check: one copy in each split, so all of val leaks.
        copies = {"texts/hamlet_gut.txt", "texts/hamlet_gut_copy.txt"}
        assert copies & set(result.report["val"])
        assert copies & set(result.report["train"])
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
    result = clean_corpus(raw, make_params(min_chars=threshold))
    assert result.metrics["docs_short"] == 3
    assert result.report["short"] == ["texts/errata.txt", "texts/hamlet_gut.txt",
                                      "texts/hamlet_gut_copy.txt"]
    assert result.metrics["docs_kept"] == 2
    assert "Ber. Who's there?" not in result.train_text + result.val_text


def test_clean_corpus_min_chars_counts_the_cleaned_text(tmp_path: Path) -> None:
    # A long licence around a one-line text: long as read, short once stripped.
    body = "Who's there? Nay, answer me: stand, and unfold yourself.\n"
    raw = write_raw(tmp_path / "raw", {
        "a.txt": GUTENBERG_HEADER + body + GUTENBERG_FOOTER,
        "b.txt": HAMLET_MODERN,
        "c.txt": MACBETH_MODERN,
    })
    result = clean_corpus(raw, make_params(strip_boilerplate=True, min_chars=200))
    assert result.report["short"] == ["a.txt"]


def test_clean_corpus_refuses_when_everything_is_dropped(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    with pytest.raises(GptlabError, match=r"clean\.min_chars") as caught:
        clean_corpus(raw, make_params(min_chars=1_000_000))
    assert str(raw) in str(caught.value)


def test_clean_corpus_tail_split(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", CORPUS)
    result = clean_corpus(raw, make_params(split="tail", dedupe="near",
                                           min_chars=CORPUS_MIN_CHARS))
    joined = join_documents([Document("f", HAMLET_FOLIO), Document("m", MACBETH_MODERN)])
    assert result.train_text + result.val_text == joined
    assert result.metrics["train_chars"] + result.metrics["val_chars"] == len(joined)


def test_clean_corpus_normalises_before_deduplicating(tmp_path: Path) -> None:
    # The same text with and without a Gutenberg wrapper is one document once stripped.
    raw = write_raw(tmp_path / "raw", {
        "a.txt": GUTENBERG_HEADER + HAMLET_MODERN + GUTENBERG_FOOTER,
        "b.txt": HAMLET_MODERN,
        "c.txt": MACBETH_MODERN,
    })
    result = clean_corpus(raw, make_params(strip_boilerplate=True, dedupe="exact"))
    assert result.metrics["docs_exact_duplicates"] == 1
    assert "Project Gutenberg" not in result.train_text + result.val_text


def test_clean_corpus_needs_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(GptlabError, match="not found"):
        clean_corpus(tmp_path / "raw", make_params())
    (tmp_path / "raw" / "manifest.json").write_text('{"files": [{"name": "a.txt"}]}')
    with pytest.raises(GptlabError, match="not a download manifest"):
        clean_corpus(tmp_path / "raw", make_params())


def test_nfkc_then_lowercase_applies_to_the_corpus(tmp_path: Path) -> None:
    ligatured = HAMLET_MODERN.replace("fi", "\ufb01")
    raw = write_raw(tmp_path / "raw", {"a.txt": ligatured, "b.txt": MACBETH_MODERN})
    result = clean_corpus(raw, make_params(unicode="NFKC", lowercase=True, split="tail"))
    text = result.train_text + result.val_text
    assert "\ufb01" not in text
    assert text == text.lower()
    assert unicodedata.is_normalized("NFKC", text)


# ---------------------------------------------------------------------------------------------
# the clean stage


def test_clean_stage_writes_its_outputs(tmp_path: Path, params_for) -> None:
    write_raw(tmp_path / "data" / "raw", CORPUS)
    write_params(tmp_path, params_for({"clean.min_chars": CORPUS_MIN_CHARS}))
    result = run_stage("clean.py", tmp_path)
    assert result.returncode == 0, result.stderr
    clean = tmp_path / "data" / "clean"
    assert sorted(p.name for p in clean.iterdir()) == ["report.json", "train.txt", "val.txt"]
    train = (clean / "train.txt").read_text(encoding="utf-8")
    val = (clean / "val.txt").read_text(encoding="utf-8")
    report = json.loads((clean / "report.json").read_text(encoding="utf-8"))
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
    line = one_error_line(run_stage("clean.py", tmp_path))
    assert "texts/ophelia.txt" in line and "byte offset 3" in line
    assert not (tmp_path / "data" / "clean").exists()
    assert not (tmp_path / "metrics" / "clean.json").exists()


def test_clean_stage_refuses_an_empty_corpus_in_one_line(tmp_path: Path, params_for) -> None:
    write_raw(tmp_path / "data" / "raw", {"empty.txt": "", "blank.txt": "\n\n"})
    write_params(tmp_path, params_for())
    line = one_error_line(run_stage("clean.py", tmp_path))
    assert "clean.min_chars=500" in line and "2 read" in line
    assert not (tmp_path / "data" / "clean").exists()
