//! Compiles the C++ shim (csrc/shim.cpp) against the headers of the installed torch.
use std::process::Command;

fn python() -> String {
    std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| {
        if std::env::var_os("VIRTUAL_ENV").is_some() { "python".into() } else { "python3".into() }
    })
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let py = python();
    let out = Command::new(&py)
        .args([
            "-c",
            "import torch\nfrom torch.utils.cpp_extension import include_paths\n\
             print(int(torch._C._GLIBCXX_USE_CXX11_ABI))\nprint('\\n'.join(include_paths()))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running {py} to find torch's headers: {e}"));
    assert!(out.status.success(), "{py} could not import torch: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8 paths");
    let mut lines = text.lines();
    let abi = lines.next().expect("cxx11 abi flag");
    let mut build = cc::Build::new();
    build.cpp(true).file("csrc/shim.cpp").std("c++17").define("_GLIBCXX_USE_CXX11_ABI", abi).warnings(false);
    for inc in lines.filter(|l| !l.is_empty()) {
        build.include(inc);
    }
    build.compile("sp_shim");
}
