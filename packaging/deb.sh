#!/usr/bin/env bash
# Builds the Debian package: the release binary, the man page and shell completions it
# generates, the unit with the packaged binary's path, then `cargo deb --no-build`.
# Needs cargo-deb (`cargo install cargo-deb --locked`). Output: target/debian/apilb_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
out=target/pkg
rm -rf "$out" && mkdir -p "$out/completions"
bin=target/release/apilb
"$bin" manpage | gzip -9n > "$out/apilb.1.gz"
"$bin" completions bash > "$out/completions/apilb"
"$bin" completions zsh > "$out/completions/_apilb"
"$bin" completions fish > "$out/completions/apilb.fish"
sed 's|/usr/local/bin/apilb|/usr/bin/apilb|g' systemd/apilb.service > "$out/apilb.service"
cargo deb --no-build --quiet
ls target/debian/*.deb
