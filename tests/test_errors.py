import os
import re

import pytest

from distillkit.errors import ConfigError, one_line, quote_input, resolved_against


def test_quote_input_keeps_a_message_on_one_line():
    assert quote_input("a\nb") == "'a\\nb'"
    assert quote_input("plain") == "'plain'"
    assert quote_input("\x1b[31m") == "'\\x1b[31m'"
    assert quote_input({"k\n": 1}) == "{'k\\n': 1}"
    long = quote_input("x" * 300, limit=20)
    assert long == repr("x" * 300)[:20] + "..." and "\n" not in long


def test_one_line_joins_another_librarys_lines():
    assert one_line("while parsing\n  in '<unicode>', line 1\n\nexpected ','") == (
        "while parsing in '<unicode>', line 1 expected ','"
    )


def test_relative_paths_say_what_they_were_resolved_against(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolved_against("models/nope") == f" (resolved against {os.getcwd()})"
    assert resolved_against(tmp_path / "x") == ""


def test_relative_paths_in_errors_say_what_they_were_resolved_against(tmp_path, monkeypatch):
    from distillkit.config import load_config
    from distillkit.study.spec import load_study
    from distillkit.teacher_cache import TeacherCache

    monkeypatch.chdir(tmp_path)
    where = f"(resolved against {tmp_path})"
    with pytest.raises(ConfigError, match=re.escape(f"config file 'cfg/x.yaml' does not exist {where}")):
        load_config("cfg/x.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"study file 'study.yaml' does not exist {where}")):
        load_study("study.yaml")
    with pytest.raises(ConfigError, match=re.escape(f"teacher.cache 'cache' {where} holds no teacher cache")):
        TeacherCache("cache")
