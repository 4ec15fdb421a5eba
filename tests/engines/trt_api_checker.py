"""Static check of TensorRT calls against the recorded TensorRT 11 Python API (engines/trt/tensorrt_api_11.json).

Follows the objects a function gets from the `tensorrt` module (Builder -> create_network ->
INetworkDefinition, ...) using the return types recorded from the TensorRT headers, and checks
each attribute, call and argument against the recorded classes, methods, properties and enums.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

API_FILE = Path(__file__).resolve().parents[2] / "engines" / "trt" / "tensorrt_api_11.json"


def load_api() -> dict[str, Any]:
    return json.loads(API_FILE.read_text(encoding="utf-8"))


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)  # "Class.member" that were found in the API
    errors: list[str] = field(default_factory=list)


class _Checker:
    def __init__(self, api: dict[str, Any], report: Report) -> None:
        self.api, self.report = api, report
        self.classes, self.enums = api["classes"], api["enums"]

    def _lineage(self, cls: str) -> list[str]:
        chain, pending = [], [cls]
        while pending:
            current = pending.pop(0)
            if current in self.classes and current not in chain:
                chain.append(current)
                pending.extend(self.classes[current].get("bases", []))
        return chain

    def _member(self, cls: str, name: str) -> Optional[tuple[str, str]]:
        """('method'|'property', owning class) for an instance attribute, else None."""
        for owner in self._lineage(cls):
            entry = self.classes[owner]
            if name in entry["methods"]:
                return "method", owner
            if name in entry["properties"]:
                return "property", owner
        return None

    def _class_attribute(self, cls: str, name: str) -> Optional[str]:
        """Type of `Class.name`: a nested enum, or a value an enum exported into the class scope."""
        for owner in self._lineage(cls):
            for enum, spec in self.enums.items():
                if spec.get("scope") != owner:
                    continue
                if enum == name:
                    return f"enum:{enum}"
                if spec.get("exported_to_scope") and name in spec["values"]:
                    return f"value:{enum}"
        return None

    def type_of(self, node: ast.expr, env: dict[str, str], line: int) -> Optional[str]:
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            return self._attribute(node, env, line)
        if isinstance(node, ast.Call):
            return self._call(node, env, line)
        for child in ast.iter_child_nodes(node):  # operators, comprehensions, f-strings: check what they hold
            if isinstance(child, ast.expr):
                self.type_of(child, env, line)
            elif isinstance(child, ast.comprehension):
                for part in (child.iter, *child.ifs):
                    self.type_of(part, env, line)
        return None

    def _error(self, line: int, message: str) -> None:
        self.report.errors.append(f"line {line}: {message}")

    def _attribute(self, node: ast.Attribute, env: dict[str, str], line: int) -> Optional[str]:
        owner = self.type_of(node.value, env, line)
        name = node.attr
        if owner is None:
            return None
        if owner == "module":
            if name in self.classes:
                self.report.checked.append(name)
                return f"class:{name}"
            if name in self.enums and self.enums[name].get("scope") is None:
                self.report.checked.append(name)
                return f"enum:{name}"
            if name in self.api["module_attributes"]:
                self.report.checked.append(name)
                return None
            self._error(line, f"tensorrt.{name} is not in the TensorRT 11 API")
            return None
        if owner.startswith("class:"):
            cls = owner[6:]
            found = self._class_attribute(cls, name)
            if found is None:
                self._error(line, f"tensorrt.{cls}.{name} is not in the TensorRT 11 API")
            else:
                self.report.checked.append(f"{cls}.{name}")
            return found
        if owner.startswith("enum:"):
            enum = owner[5:]
            if name not in self.enums[enum]["values"]:
                self._error(line, f"{enum}.{name} is not a value of {enum} in TensorRT 11")
                return None
            self.report.checked.append(f"{enum}.{name}")
            return f"value:{enum}"
        member = self._member(owner, name)
        if member is None:
            self._error(line, f"{owner}.{name} does not exist in TensorRT 11")
            return None
        self.report.checked.append(f"{owner}.{name}")
        return f"method:{member[1]}.{name}" if member[0] == "method" else None

    def _arguments_fit(self, overloads: list[list[list[Any]]], call: ast.Call) -> bool:
        positional = len(call.args)
        keywords = {keyword.arg for keyword in call.keywords}
        for parameters in overloads:
            names = [name for name, _ in parameters]
            required = [name for name, has_default in parameters if not has_default]
            if positional > len(names) or not keywords <= set(names[positional:]):
                continue
            if all(name in names[:positional] or name in keywords for name in required):
                return True
        return False

    def _call(self, node: ast.Call, env: dict[str, str], line: int) -> Optional[str]:
        for argument in [*node.args, *(k.value for k in node.keywords)]:
            self.type_of(argument, env, line)  # arguments may use TensorRT names too
        callee = self.type_of(node.func, env, line)
        if callee is None:
            return None
        if callee.startswith("class:"):
            cls = callee[6:]
            overloads = self.classes[cls]["init"]
            if not self._arguments_fit(overloads, node):
                self._error(line, f"tensorrt.{cls}(...) arguments fit no constructor {overloads}")
            return cls
        if callee.startswith("method:"):
            cls, method = callee[7:].split(".")
            overloads = self.classes[cls]["methods"][method]
            if not self._arguments_fit(overloads, node):
                self._error(line, f"{cls}.{method}(...) arguments fit no signature {overloads}")
            return self.classes[cls].get("returns", {}).get(method)
        return None

    def function(self, function: ast.FunctionDef, module_aliases: set[str]) -> None:
        env = {alias: "module" for alias in module_aliases}
        for statement in ast.walk(function):
            if isinstance(statement, ast.Import):
                for alias in statement.names:
                    if alias.name == "tensorrt":
                        env[alias.asname or alias.name] = "module"
        for statement in _statements(function.body):
            line = statement.lineno
            if isinstance(statement, ast.Assign):
                value_type = self.type_of(statement.value, env, line)
                for target in statement.targets:
                    if isinstance(target, ast.Name):
                        if value_type and not value_type.startswith(("method:", "value:")):
                            env[target.id] = value_type
                    elif isinstance(target, ast.Attribute):
                        owner = self.type_of(target.value, env, line)
                        if owner and not owner.startswith(("class:", "enum:", "module")):
                            if self._member(owner, target.attr) != ("property", self._owner(owner, target.attr)):
                                self._error(line, f"{owner}.{target.attr} is not a settable property in TensorRT 11")
                            else:
                                self.report.checked.append(f"{owner}.{target.attr}")
            else:  # the statement's own expressions; nested statements come in their turn
                for child in ast.iter_child_nodes(statement):
                    if isinstance(child, ast.withitem):
                        child = child.context_expr
                    if isinstance(child, ast.expr):
                        self.type_of(child, env, line)

    def _owner(self, cls: str, name: str) -> str:
        member = self._member(cls, name)
        return member[1] if member else ""


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements in source order, nested blocks (if/for/with/try) flattened."""
    flat: list[ast.stmt] = []
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        flat.append(statement)
        for attribute in ("body", "orelse", "finalbody", "handlers"):
            nested = getattr(statement, attribute, None)
            if isinstance(nested, list) and nested and isinstance(nested[0], (ast.stmt, ast.ExceptHandler)):
                for item in nested:
                    flat.extend(_statements(item.body) if isinstance(item, ast.ExceptHandler) else _statements([item]))
    return flat


def check_source(source: str, api: Optional[dict[str, Any]] = None) -> Report:
    """Check every function of a module that imports tensorrt (lazily or at top level)."""
    api = api or load_api()
    tree = ast.parse(source)
    report = Report()
    checker = _Checker(api, report)
    module_aliases = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.Import)
                      for alias in node.names if alias.name == "tensorrt"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            checker.function(node, module_aliases)
    return report
