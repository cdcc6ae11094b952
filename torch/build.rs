//! The helper and its tests find libtorch where they were built against (`LIBTORCH`): its
//! library folder goes into their run path, so no `LD_LIBRARY_PATH` is needed.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
