"""Record the TensorRT Python API surface (classes, methods with argument names, properties, enums).

Reads the pybind11 binding sources of a TensorRT release (python/src/**/*.cpp of the public
NVIDIA/TensorRT repository at a release commit) and writes engines/trt/tensorrt_api_11.json, the data the
contract tests check engines/trt/builder.py against. Optionally cross-checks every recorded name against the
strings of a released bindings binary (tensorrt.so from the `tensorrt-cu12-bindings` wheel), which
holds the names pybind11 registers but cannot be imported without libnvinfer.

    python -m engines.trt.extract_api --source CHECKOUT --commit SHA --version 11.1.0.106 \
        [--binary tensorrt.so --binary-version 11.4.0.106] -o engines/trt/tensorrt_api_11.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Iterator

BINDING_FILES = (
    "python/src/infer/pyCore.cpp",
    "python/src/infer/pyGraph.cpp",
    "python/src/infer/pyFoundationalTypes.cpp",
    "python/src/parsers/pyOnnx.cpp",
)
# Qualified names TensorRT 11 removed (FACTS.md, TensorRT 11 release notes): verified absent below.
REMOVED = (
    "BuilderFlag.INT8", "BuilderFlag.FP16", "BuilderFlag.FP8", "BuilderFlag.BF16", "BuilderFlag.INT4",
    "BuilderFlag.STRICT_TYPES", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "NetworkDefinitionCreationFlag.EXPLICIT_PRECISION",
    "IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
    "IInt8LegacyCalibrator", "CalibrationAlgoType", "IBuilderConfig.int8_calibrator",
    "IBuilderConfig.max_workspace_size", "Builder.build_engine", "Builder.max_batch_size",
    "Builder.platform_has_fast_int8", "Builder.platform_has_fast_fp16",
)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_CHAIN_START = re.compile(r'py::(class_|enum_)\s*<')
_IDENT = re.compile(r'\s*(\w+)\s*[({]')
_MEMBER = re.compile(r'\.(def|def_static|def_property|def_property_readonly|def_readwrite|def_readonly|value)\s*\(')
_ARG = re.compile(r'"(\w+)"_a(\s*=)?')


def _strip_comments(text: str) -> str:
    text = re.sub(r'/\*.*?\*/', ' ', text, flags=re.S)
    return re.sub(r'//[^\n]*', ' ', text)


def _matching(text: str, start: int, open_char: str, close_char: str) -> int:
    """Index just after the bracket closing the one at `start` (strings skipped)."""
    depth = 0
    index = start
    while index < len(text):
        char = text[index]
        if char == '"':
            index = _STRING.match(text, index).end()
            continue
        if char == open_char:
            depth += 1
        elif char == close_char:
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise ValueError("unbalanced brackets")


def _chains(text: str) -> Iterator[dict[str, Any]]:
    """Every py::class_ / py::enum_ binding: kind, python name, C++ template arguments, scope, variable, chain."""
    for match in _CHAIN_START.finditer(text):
        template_end = _matching(text, match.end() - 1, '<', '>')
        template = [part.strip() for part in text[match.end():template_end - 1].split(',')]
        variable = _IDENT.match(text, template_end)  # `py::class_<T> name{m, "Name"}`
        opening = min(i for i in (text.find('(', template_end), text.find('{', template_end)) if i >= 0)
        close = ')' if text[opening] == '(' else '}'
        args_end = _matching(text, opening, text[opening], close)
        name = _STRING.search(text, opening, args_end)
        if name is None:
            continue
        scope = text[opening + 1:name.start()].strip().rstrip(',').strip()
        statement_end = text.index(';', args_end)
        while text.count('(', args_end, statement_end) != text.count(')', args_end, statement_end):
            statement_end = text.index(';', statement_end + 1)
        yield {
            "kind": match.group(1), "name": name.group(0).strip('"'), "template": template, "scope": scope,
            "variable": variable.group(1) if variable and text[opening] == '{' else None,
            "chain": text[args_end:statement_end],
        }


def _members(chain: str) -> Iterator[tuple[str, str, str]]:
    for match in _MEMBER.finditer(chain):
        paren = match.end() - 1
        if chain[:match.start()].count('(') != chain[:match.start()].count(')'):
            continue  # nested inside another call
        body = chain[paren + 1:_matching(chain, paren, '(', ')') - 1]
        yield match.group(1), body, chain


_MEMBER_POINTER = re.compile(r'&(?:nvinfer1::|nvonnxparser::)?(\w+)::(\w+)')
_DOC_CONSTANT = re.compile(r'(\w+Doc)::(\w+)')
_HEADERS = ("include/NvInfer.h", "include/NvInferRuntime.h", "include/NvInferRuntimeBase.h", "include/NvOnnxParser.h")
_header_cache: dict[Path, str] = {}


def _headers(source: Path) -> str:
    if source not in _header_cache:
        _header_cache[source] = "\n".join(
            (source / h).read_text(encoding="utf-8") for h in _HEADERS if (source / h).is_file())
    return _header_cache[source]


def _return_type(body: str, python_name: dict[str, str], source: Path) -> str | None:
    """The bound class a method returns: from the C++ declaration of the member it binds, else its docstring."""
    pointer = _MEMBER_POINTER.search(body)
    if pointer:
        cpp_class, cpp_method = pointer.groups()
        headers = _headers(source)
        start = re.search(rf'class {cpp_class}\b[^;{{]*\{{', headers)
        if start:
            declaration = re.compile(rf'(?:nvinfer1::)?(\w+)\s*(?:const\s*)?\*\s*{cpp_method}\s*\(')
            found = declaration.search(headers, start.end())
            if found and found.group(1) in python_name:
                return python_name[found.group(1)]
    doc = _DOC_CONSTANT.search(body)
    if doc:
        docs = "\n".join(path.read_text(encoding="utf-8") for path in (source / "python/docstrings").rglob("*.h"))
        block = re.search(rf'namespace {doc.group(1)}\b.*?constexpr char const\* {doc.group(2)} = R"trtdoc\((.*?)\)trtdoc"',
                          docs, flags=re.S)
        if block:
            returns = re.search(r':returns:[^\n]*?:class:`(\w+)`', block.group(1))
            if returns:
                return returns.group(1)
    return None


def extract(source: Path) -> dict[str, Any]:
    classes: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    bindings = [b for relative in BINDING_FILES
                for b in _chains(_strip_comments((source / relative).read_text(encoding="utf-8")))]
    python_name = {b["template"][0]: b["name"] for b in bindings if b["kind"] == "class_"}
    variables = {b["variable"]: b["name"] for b in bindings if b["variable"]}
    for binding in bindings:
        name, chain = binding["name"], binding["chain"]
        if binding["kind"] == "enum_":
            values = [_STRING.match(body.strip()).group(0).strip('"')
                      for member, body, _ in _members(chain) if member == "value"]
            owner = variables.get(binding["scope"])  # enums bound inside a class: trt.ILogger.Severity
            enums[name] = {"values": values, "scope": owner, "exported_to_scope": ".export_values()" in chain}
            continue
        entry = classes.setdefault(name, {"methods": {}, "properties": [], "init": [], "bases": []})
        entry["bases"] = [python_name[t] for t in binding["template"][1:] if t in python_name]
        if True:
            for member, body, _ in _members(chain):
                literal = _STRING.match(body.strip())
                arguments = [[arg, bool(default)] for arg, default in _ARG.findall(body)]
                if member == "def" and literal is None and "py::init" in body:
                    entry["init"].append(arguments)
                elif literal is None:
                    continue
                elif member in ("def", "def_static"):
                    method = literal.group(0).strip('"')
                    entry["methods"].setdefault(method, []).append(arguments)
                    returned = _return_type(body, python_name, source)
                    if returned:
                        entry.setdefault("returns", {})[method] = returned
                else:
                    entry["properties"].append(literal.group(0).strip('"'))
    return {"classes": classes, "enums": enums}


def _in_binary(blob: bytes, name: str) -> bool:
    # pybind11 keeps registered names as NUL-terminated literals; the linker may merge one into the
    # tail of a longer literal ("ERROR" inside "INTERNAL_ERROR"), so look for the name and its NUL.
    return name.encode() + b"\0" in blob


TRTEXEC_OPTIONS_FILE = "samples/common/sampleOptions.cpp"
_TRTEXEC_OPTION = re.compile(r'"(--[A-Za-z][A-Za-z0-9]*)"')


def trtexec_options(source: Path) -> list[str]:
    """Every `--flag` literal trtexec's option parser reads (samples/common/sampleOptions.cpp)."""
    text = _strip_comments((source / TRTEXEC_OPTIONS_FILE).read_text(encoding="utf-8"))
    return sorted(set(_TRTEXEC_OPTION.findall(text)))


PACKAGE_INIT = "python/packaging/bindings_wheel/tensorrt/__init__.py"


def module_attributes(source: Path) -> list[str]:
    """Names the package's pure-Python __init__ defines at top level (e.g. __version__)."""
    text = (source / PACKAGE_INIT).read_text(encoding="utf-8")
    return sorted(set(re.findall(r'^(\w+)\s*=', text, flags=re.M)) | set(re.findall(r'^def (\w+)', text, flags=re.M)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--binary", type=Path)
    parser.add_argument("--binary-version")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    surface = extract(args.source)
    removed_present = []
    for qualified in REMOVED:
        owner, _, member = qualified.partition(".")
        if not member and (owner in surface["classes"] or owner in surface["enums"]):
            removed_present.append(qualified)
        elif member and (member in surface["enums"].get(owner, {}).get("values", [])
                         or member in surface["classes"].get(owner, {}).get("methods", {})
                         or member in surface["classes"].get(owner, {}).get("properties", [])):
            removed_present.append(qualified)
    if removed_present:
        raise SystemExit(f"names listed as removed are bound in this source: {removed_present}")
    provenance: dict[str, Any] = {
        "source": "github.com/NVIDIA/TensorRT",
        "commit": args.commit,
        "version": args.version,
        "files": [*BINDING_FILES, TRTEXEC_OPTIONS_FILE, *_HEADERS, "python/docstrings/**/*.h", PACKAGE_INIT],
        "extracted_by": "engines/trt/extract_api.py",
    }
    if args.binary:
        blob = args.binary.read_bytes()
        names = (set(surface["classes"]) | set(surface["enums"])
                 | {m for c in surface["classes"].values() for m in c["methods"]}
                 | {p for c in surface["classes"].values() for p in c["properties"]}
                 | {v for e in surface["enums"].values() for v in e["values"]})
        missing = sorted(name for name in names if not _in_binary(blob, name))
        removed_classes = [name for name in REMOVED if "." not in name]
        provenance["binary_check"] = {
            "package": f"tensorrt-cu12-bindings {args.binary_version}",
            "file": "tensorrt_bindings/tensorrt.so",
            "names_not_found_in_binary": missing,
            # removed classes are absent from the released binary too (members like BuilderFlag.INT8 cannot be
            # told apart there from DataType.INT8, which still exists)
            "removed_classes_found_in_binary": [name for name in removed_classes if _in_binary(blob, name)],
        }
    data = {"provenance": provenance, "removed": list(REMOVED), **surface,
            "trtexec_options": trtexec_options(args.source), "module_attributes": module_attributes(args.source)}
    args.output.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(surface['classes'])} classes, {len(surface['enums'])} enums -> {args.output}")


if __name__ == "__main__":
    main()
