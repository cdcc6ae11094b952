//! With the `torch` feature, binaries and tests find libtorch where it was built against
//! (`LIBTORCH`): its library folder goes into their run path, so no `LD_LIBRARY_PATH` is needed.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some()
        && let Some(libtorch) = std::env::var_os("LIBTORCH")
    {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
