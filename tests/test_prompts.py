import pytest

from pudl.errors import UserError
from pudl.prompts import load_prompts


def test_load_prompts_fields_and_default_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "id": "x", "answer": "1"}\n\n{"prompt": "b", "system": "s"}\n')
    ps = load_prompts(path)
    assert [(p.id, p.prompt, p.system, p.answer) for p in ps] == [("x", "a", None, "1"), ("line3", "b", "s", None)]


@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": "a"}\n{"prompt": \n', "p.jsonl:2: invalid JSON"),
    (b'{"prompt": "a"}\n[1, 2]\n', "p.jsonl:2: expected a JSON object"),
    (b'{"prompt": ""}\n', "p.jsonl:1: 'prompt' must be a non-empty string"),
    (b'{"prompt": "a", "extra": 1}\n', "p.jsonl:1: unknown field"),
    (b'{"prompt": "a", "id": 3}\n', "p.jsonl:1: 'id' must be a string"),
    (b'{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', "p.jsonl:2: duplicate prompt id"),
    (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', "p.jsonl:2: not valid UTF-8"),
    (b"\n\n", "prompts file is empty"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        load_prompts(path)
