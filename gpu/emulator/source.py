r"""Kernel source -> a host C++ translation unit for the emulator (text only, no compiler).

:func:`assemble` inlines the ``#include``\ s of the kernel headers (``common.cuh``,
``mma.cuh``) of a ``.cu`` file like
:func:`refattn.gpu.kernels_spec.source` does, with ``#line`` directives so that every
line keeps its file and number. :func:`rewrite_asm` turns each inline-asm statement
``asm volatile("ptx" : outputs : inputs : clobbers)`` into a call of the emulator's PTX
executor, ``::emu::ptx(site, ::emu::out<'r'>(x), ::emu::in<'l'>(p), ...)``, on the same
line (the statement's newlines are kept), and returns the sites: the PTX text, its
operand constraints and its file and line. :func:`translation_unit` adds the emulation
header, the dynamic shared memory and one launch thunk per template instantiation.

>>> text = 'asm volatile("cp.async.wait_group %0;\\n" ::"n"(1) : "memory");'
>>> out, sites = rewrite_asm(text, "k.cu")
>>> out
'::emu::ptx(0, ::emu::imm(1));'
>>> sites[0].ptx, sites[0].constraints, sites[0].line
('cp.async.wait_group %0;\n', 'n', 1)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Site", "EmulatorSourceError", "assemble", "code_mask", "rewrite_asm",
           "shared_array", "translation_unit", "c_string"]


class EmulatorSourceError(ValueError):
    """The kernel source uses something the emulator cannot run (said where and why)."""


@dataclass(frozen=True)
class Site:
    """One inline-asm statement: its PTX, constraints (outputs first, comma-separated,
    ``=``/``+`` kept) and where it is."""

    ptx: str
    constraints: str
    file: str
    line: int


def assemble(cu_text: str, name: str, headers: dict) -> str:
    """``cu_text`` with each ``#include "<header>"`` line of ``headers`` (name -> text)
    replaced by the header's text, exactly as :func:`refattn.gpu.kernels_spec.source`
    does, plus ``#line`` directives (file names and line numbers stay those of the files).

    >>> print(assemble('#include "h.cuh"\\n\\nint x;\\n', "k.cu", {"h.cuh": "int y;\\n"}))
    #line 1 "k.cu"
    #line 1 "h.cuh"
    int y;
    #line 2 "k.cu"
    <BLANKLINE>
    int x;
    <BLANKLINE>
    >>> two = assemble('#include "a.h"\\n#include "b.h"\\nint x;\\n', "k.cu",
    ...                {"a.h": "int a;\\nint a2;\\n", "b.h": "int b;\\n"})
    >>> two.splitlines()[-3:]     # the rest of line 2, then line 3, whatever a.h's length
    ['#line 2 "k.cu"', '', 'int x;']
    """
    if not headers:
        return f'#line 1 "{name}"\n' + cu_text

    def put(m):                  # one pass: every match's position is in cu_text itself
        header = m.group(1)
        body, line = headers[header], cu_text.count("\n", 0, m.end()) + 1
        tail = "" if body.endswith("\n") else "\n"
        return f'#line 1 "{header}"\n{body}{tail}#line {line} "{name}"\n'
    # the same pattern as kernels_spec.source, so the text is the same but for #line
    names = "|".join(re.escape(h) for h in headers)
    text = re.sub(rf'^#include "({names})"\s*$', put, cu_text, flags=re.M)
    return f'#line 1 "{name}"\n' + text


def code_mask(text: str) -> str:
    """``text`` with comments and the insides of string and character literals blanked
    (newlines kept), so that searches see code only; same length as ``text``.

    >>> code_mask('a = "asm(" ; // asm(\\nb')
    'a = "    " ;        \\nb'
    """
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out[i:j] = [ch if ch == "\n" else " " for ch in text[i:j]]
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out[i + 1:j] = " " * (j - i - 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


_LINE = re.compile(r'^#line\s+(\d+)\s+"([^"]*)"', re.M)


def _position(text: str, pos: int, default_file: str) -> tuple[str, int]:
    """(file, line) of ``pos`` under the ``#line`` directives before it."""
    file, base, start = default_file, 1, 0
    for m in _LINE.finditer(text, 0, pos):
        file, base = m.group(2), int(m.group(1))
        start = text.index("\n", m.end()) + 1
    return file, base + text.count("\n", start, pos)


_ESC = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _strings(section: str, where: str) -> str:
    """The concatenation of the adjacent string literals ``section`` consists of."""
    out, i, s = [], 0, section.strip()
    while i < len(s):
        if s[i].isspace():
            i += 1
            continue
        if s[i] != '"':
            raise EmulatorSourceError(f"{where}: the asm template must be string literals, "
                                      f"got {s[i:i + 30]!r}")
        i += 1
        while s[i] != '"':
            if s[i] == "\\":
                if s[i + 1] not in _ESC:
                    raise EmulatorSourceError(f"{where}: escape \\{s[i + 1]} in asm string")
                out.append(_ESC[s[i + 1]])
                i += 2
            else:
                out.append(s[i])
                i += 1
        i += 1
    return "".join(out)


def _split(text: str, mask: str, sep: str) -> list[tuple[int, int]]:
    """Spans of ``text`` split at ``sep`` outside parentheses (``mask`` blanks strings)."""
    spans, depth, start = [], 0, 0
    for i, c in enumerate(mask):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            spans.append((start, i))
            start = i + 1
    spans.append((start, len(text)))
    return spans


_OPERAND = re.compile(r'^\s*"([^"]*)"\s*\((.*)\)\s*$', re.S)
_ASM = re.compile(r"\b(?:asm|__asm__|__asm)\s*(?:(?:volatile|__volatile__)\s*)?\(")


def _operands(section: str, smask: str, output: bool, where: str):
    """``[(constraint, C++ expression)]`` of an operand list."""
    out = []
    if not section.strip():
        return out
    for a, b in _split(section, smask, ","):
        m = _OPERAND.match(section[a:b])
        if not m:
            raise EmulatorSourceError(f"{where}: cannot read asm operand "
                                      f"{section[a:b].strip()!r} (named operands are not "
                                      f"supported)")
        cons, expr = m.group(1).replace("&", ""), m.group(2)
        letter = cons[-1:] if cons else ""
        prefix = cons[0] if cons[:1] in ("=", "+") else ""
        if output != bool(prefix) or letter not in "rlfhdcni" \
                or len(cons) != len(prefix) + 1:
            raise EmulatorSourceError(f"{where}: asm constraint {cons!r} is not supported")
        out.append((prefix + letter, expr))
    return out


def rewrite_asm(text: str, default_file: str = "<source>") -> tuple[str, list[Site]]:
    """Replace every inline-asm statement of ``text`` by a call of the PTX executor,
    keeping line numbers; returns the new text and the sites (indexed as called)."""
    mask = code_mask(text)
    pieces, sites, pos = [], [], 0
    for m in _ASM.finditer(mask):
        if m.start() < pos:
            continue
        file, line = _position(text, m.start(), default_file)
        where = f"{file}:{line}"
        depth, i = 1, m.end()
        while depth:
            if i >= len(mask):
                raise EmulatorSourceError(f"{where}: unbalanced parentheses in asm")
            depth += {"(": 1, ")": -1}.get(mask[i], 0)
            i += 1
        inner, imask = text[m.end():i - 1], mask[m.end():i - 1]
        parts = [(inner[a:b], imask[a:b]) for a, b in _split(inner, imask, ":")]
        if len(parts) > 4:
            raise EmulatorSourceError(f"{where}: asm goto is not supported")
        parts += [("", "")] * (4 - len(parts))
        ptx = _strings(parts[0][0], where)
        outs = _operands(*parts[1], True, where)
        ins = _operands(*parts[2], False, where)
        args = []
        for cons, expr in outs:
            fn = "out" if cons[0] == "=" else "inout"
            args.append(f"::emu::{fn}<'{cons[1]}'>({expr})")
        for cons, expr in ins:
            args.append(f"::emu::imm({expr})" if cons in "ni"
                        else f"::emu::in<'{cons}'>({expr})")
        call = f"::emu::ptx({len(sites)}" + "".join(", " + a for a in args)
        call += "\n" * text.count("\n", m.start(), i) + ")"
        cons = ",".join(c for c, _ in outs + ins).replace("i", "n")
        sites.append(Site(ptx, cons, file, line))
        pieces += [text[pos:m.start()], call]
        pos = i
    pieces.append(text[pos:])
    return "".join(pieces), sites


_EXTERN_SHARED = re.compile(r"\bextern\s+__shared__\s+([^;\[\]]*?)\b(\w+)\s*\[\s*\]\s*;")


def shared_array(text: str) -> tuple[str, str] | None:
    """``(element type, name)`` of the source's ``extern __shared__`` array (None when it
    has none); several different ones are refused.

    >>> shared_array("extern __shared__ __align__(128) unsigned char smem_raw[];")
    ('unsigned char', 'smem_raw')
    """
    found = set()
    for m in _EXTERN_SHARED.finditer(code_mask(text)):
        etype = re.sub(r"__align__\s*\(\s*\d+\s*\)", " ", m.group(1))
        found.add((" ".join(etype.split()), m.group(2)))
    if len(found) > 1:
        raise EmulatorSourceError(f"several extern __shared__ arrays {sorted(found)}: the "
                                  f"emulator supports one name per source")
    return next(iter(found)) if found else None


def c_string(s: str) -> str:
    """A C string literal holding ``s``.

    >>> print(c_string('a "b"\\n'))
    "a \\"b\\"\\n"
    """
    body = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + body.replace("\t", "\\t").replace("\0", "\\0") + '"'


def translation_unit(code: str, names: list[str], default_file: str = "<source>") -> str:
    """The C++ the emulator compiles for ``code`` (a CUDA source, ``#line`` directives
    allowed) with the template instantiations ``names`` (NVRTC name expressions)."""
    if not names:
        raise EmulatorSourceError("no kernel name expressions to instantiate")
    body, sites = rewrite_asm(code, default_file)
    shared = shared_array(code)
    etype, ename = shared if shared else ("unsigned char", "emu_no_dynamic_shared_memory")
    out = ['#include "cuda_emu.h"',
           f"thread_local __attribute__((aligned(128))) {etype} "
           f"{ename}[EMU_SMEM_CAPACITY / sizeof({etype})];",
           'extern "C" unsigned char* emu_module_smem() {',
           f"  return reinterpret_cast<unsigned char*>({ename});", "}",
           "static const ::emu::Site emu_sites_[] = {"]
    for s in sites:
        out.append(f"  {{{c_string(s.ptx)}, {c_string(s.constraints)}, {c_string(s.file)}, "
                   f"{s.line}}},")
    out += ["  {nullptr, nullptr, nullptr, 0}};",
            'extern "C" const ::emu::Site* emu_module_sites(int* n) {',
            f"  *n = {len(sites)};", "  return emu_sites_;", "}",
            "" if body.startswith("#line") else f'#line 1 "{default_file}"', body,
            '#line 1 "<emulator launch thunks>"']
    for i, name in enumerate(names):
        out.append(f"static void emu_thunk_{i}(void** p) {{ ::emu::invoke(&{name}, p); }}")
        out.append(f"static const char* emu_sig_{i}() "
                   f"{{ return ::emu::signature(&{name}); }}")
    out.append('extern "C" const ::emu::Kernel* emu_module_kernels(int* n) {')
    out.append("  static const ::emu::Kernel k[] = {")
    for i, name in enumerate(names):
        out.append(f"    {{{c_string(name)}, emu_thunk_{i}, emu_sig_{i}}},")
    out += ["  };", f"  *n = {len(names)};", "  return k;", "}", ""]
    return "\n".join(out)
