//! Compiles the C++ sources (csrc/: the shim and the torch ops) against the headers of the torch installed for the
//! building Python, and
//! records that torch's version (`SP_TORCH_VERSION`) for the extension to report.
use std::path::PathBuf;
use std::process::Command;

fn python() -> String {
    std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| {
        if std::env::var_os("VIRTUAL_ENV").is_some() { "python".into() } else { "python3".into() }
    })
}

/// The C++ sources of the repository's `csrc/`: the build script serves every manifest of the extension (one per
/// tch line), so the directory is found from the manifest's directory upwards.
fn sources() -> Vec<PathBuf> {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let csrc = dir.ancestors().map(|d| d.join("csrc")).find(|p| p.join("shim.cpp").exists());
    let csrc = csrc.expect("csrc/ above the manifest");
    ["shim.cpp", "ops.cpp", "guarded.h"].iter().map(|f| csrc.join(f)).collect()
}

fn main() {
    let sources = sources();
    for f in &sources {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let py = python();
    let out = Command::new(&py)
        .args([
            "-c",
            "import torch\nfrom torch.utils.cpp_extension import include_paths\n\
             print(torch.__version__.split('+')[0])\n\
             print(int(torch._C._GLIBCXX_USE_CXX11_ABI))\nprint('\\n'.join(include_paths()))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running {py} to find torch's headers: {e}"));
    assert!(out.status.success(), "{py} could not import torch: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8 paths");
    let mut lines = text.lines();
    let version = lines.next().expect("torch version");
    println!("cargo:rustc-env=SP_TORCH_VERSION={version}");
    let abi = lines.next().expect("cxx11 abi flag");
    let mut build = cc::Build::new();
    // C++20: torch 2.14's headers require it, and the shim compiles under it against every supported torch.
    let units = sources.iter().filter(|f| f.extension().is_some_and(|e| e == "cpp"));
    build.cpp(true).files(units).std("c++20").define("_GLIBCXX_USE_CXX11_ABI", abi).warnings(false);
    for inc in lines.filter(|l| !l.is_empty()) {
        build.include(inc);
    }
    build.compile("sp_shim");
}
