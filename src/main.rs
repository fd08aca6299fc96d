fn main() {
    std::process::exit(vubd::cli::main());
}
