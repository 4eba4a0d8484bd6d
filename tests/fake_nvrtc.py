"""A stand-in for cupy_backends' nvrtc module, for the CPU tests of the compile path and the
kernel cache (cupy_backend._nvrtc_compile, cache_key; bench/precompile_kernels.py)."""
import sys
import types


class FakeNvrtc:
    """Records each program's name, source, instance and options; its "cubin" names them."""

    class NVRTCError(Exception):
        pass

    def __init__(self):
        self.programs = []

    def getVersion(self):
        return (13, 0)

    def createProgram(self, source, name, headers, include_names):
        self.programs.append({"name": name, "source": source})
        return len(self.programs) - 1

    def addNameExpression(self, prog, expr):
        self.programs[prog]["expr"] = expr

    def compileProgram(self, prog, options):
        self.programs[prog]["options"] = list(options)

    def getLoweredName(self, prog, expr):
        return "lowered_" + expr

    def getCUBIN(self, prog):
        p = self.programs[prog]
        return f"cubin of {p['expr']}: {' '.join(p['options'])}".encode()

    def destroyProgram(self, prog):
        pass


def install_fake_nvrtc(monkeypatch) -> FakeNvrtc:
    """Make ``from cupy_backends.cuda.libs import nvrtc`` return a new FakeNvrtc for this test."""
    fake = FakeNvrtc()
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.nvrtc = fake
    for name, mod in (("cupy_backends", types.ModuleType("cupy_backends")),
                      ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                      ("cupy_backends.cuda.libs", libs), ("cupy_backends.cuda.libs.nvrtc", fake)):
        monkeypatch.setitem(sys.modules, name, mod)
    return fake
