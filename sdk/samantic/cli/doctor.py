"""``samantic doctor``: versions, compiled kernel backends and what is usable now."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _yes(flag: bool) -> str:
    return "[green]yes[/green]" if flag else "[red]no[/red]"


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    from samantic.doctor import collect

    report = collect()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report)
    if "error" in report["kernels"]:
        raise typer.Exit(1)


def _print(r: dict) -> None:
    from samantic.doctor import cuda_archs, format_cuda_archs

    console = Console()
    console.print(f"samantic {r['samantic']}  ·  Python {r['python']}  ·  {r['platform']}")

    k = r["kernels"]
    kt = Table(title="Kernel backends (samantic._C)")
    for col in ("backend", "compiled", "usable now", "detail"):
        kt.add_column(col)
    if "error" in k:
        kt.add_row("-", _yes(False), _yes(False), escape(k["error"]))
    else:
        build = k["build"]
        for backend in ("cpu", "cuda"):
            u = k["usable"][backend]
            detail = u["detail"]
            if backend == "cuda" and backend in k["compiled"]:
                archs = k.get("cuda_archs") or cuda_archs(str(build.get("cuda_architectures", "")))
                detail += f"; nvcc {build.get('cuda_compiler_version')}, {format_cuda_archs(archs)}"
            if backend == "cpu":
                detail += f"; {build.get('cxx_compiler')}"
            kt.add_row(backend, _yes(backend in k["compiled"]), _yes(u["usable"]), escape(detail))
    console.print(kt)

    rt = Table(title="Runtimes")
    for col in ("runtime", "installed", "detail"):
        rt.add_column(col)
    t = r["torch"]
    if t.get("installed"):
        detail = t.get("error") or f"{t['version']}; CUDA available: {'yes' if t['cuda_available'] else 'no'}"
    else:
        detail = "pip install 'samantic[torch]'"
    rt.add_row("torch", _yes(t.get("installed", False)), escape(detail))
    o = r["onnxruntime"]
    detail = (o.get("error") or f"{o['version']}; providers: {', '.join(o['providers'])}") if o.get("installed") else "pip install 'samantic[runtime]'"
    rt.add_row("onnxruntime", _yes(o.get("installed", False)), escape(detail))
    trt = r["tensorrt"]
    detail = (trt.get("error") or trt.get("version", "")) if trt.get("installed") else trt.get("detail", "")
    rt.add_row("tensorrt", _yes(trt.get("installed", False)), escape(detail))
    console.print(rt)

    pt = Table(title="Packages")
    for col in ("package", "version", "importable"):
        pt.add_column(col)
    for p in r["packages"]:
        pt.add_row(p["package"], p["version"] or "-", _yes(p["importable"]))
    console.print(pt)
