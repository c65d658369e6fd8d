# Packaging targets for mc-proxy. Included from the top-level Makefile:
#
#   include mk/packaging.mk
#
#   make static            static musl binary, checked to have no dynamic section
#   make image             OCI image mc-proxy:$(VERSION) from Containerfile (podman)
#   make image-check       run/inspect the image, and rebuild it to prove the ID is stable
#   make packaging-check   lint/validate deploy/, nix/, flake.nix (.ci/packaging-check.sh)
#
# Needs: rustup target x86_64-unknown-linux-musl, musl-tools (musl-gcc, for the
# bundled SQLite and ring's C code), file, binutils (readelf); podman and runc
# for the image targets.

CARGO          ?= cargo
MUSL_TARGET    ?= x86_64-unknown-linux-musl
STATIC_BIN     ?= target/$(MUSL_TARGET)/release/mc-proxy
# The crate version, read from the first `version = "..."` line of Cargo.toml.
VERSION        ?= $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
PODMAN         ?= podman
IMAGE_NAME     ?= mc-proxy
IMAGE          ?= $(IMAGE_NAME):$(VERSION)
IMAGE_CONTEXT  ?= target/image-context
# What goes into the image: `make image` builds it with `make static` first;
# `make image-only IMAGE_BIN=...` packages an existing binary as is.
IMAGE_BIN      ?= $(STATIC_BIN)
CA_BUNDLE      ?= /etc/ssl/certs/ca-certificates.crt
PODMAN_BUILD_FLAGS ?=

# Rust's musl target links static-pie by default, which still carries a
# .dynamic section; the contract (SPEC §5) is "no dynamic section", hence a
# non-PIE static link. Set only for the musl target (build scripts unaffected).
# NB: a global RUSTFLAGS in the environment replaces target rustflags.
MUSL_RUSTFLAGS ?= -C relocation-model=static -C target-feature=+crt-static

.PHONY: static image image-only image-check packaging-check

static: ## static musl binary (no dynamic section): target/x86_64-unknown-linux-musl/release/mc-proxy
	@rustup target list --installed 2>/dev/null | grep -qx '$(MUSL_TARGET)' || \
	  echo 'static: warning: rust target $(MUSL_TARGET) not listed by rustup (rustup target add $(MUSL_TARGET))' >&2
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS='$(MUSL_RUSTFLAGS)' \
	  $(CARGO) build --release --locked --target $(MUSL_TARGET) --bin mc-proxy
	@desc=$$(file -b '$(STATIC_BIN)'); echo "static: $(STATIC_BIN): $$desc"; \
	case "$$desc" in \
	  *'statically linked'*) ;; \
	  *) echo 'static: FAIL: $(STATIC_BIN) is not statically linked (non-PIE); static-pie still has a dynamic section' >&2; exit 1 ;; \
	esac; \
	if command -v readelf >/dev/null 2>&1; then \
	  if readelf -d '$(STATIC_BIN)' | grep -q 'Dynamic section'; then \
	    echo 'static: FAIL: $(STATIC_BIN) has a dynamic section' >&2; exit 1; \
	  fi; \
	  echo 'static: no dynamic section'; \
	fi; \
	echo "static: size $$(stat -c %s '$(STATIC_BIN)') bytes ($$(du -h '$(STATIC_BIN)' | cut -f1))"

image: static ## OCI image mc-proxy:$(VERSION) from Containerfile (podman, FROM scratch)
	@$(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) image-only

# Stage a minimal, deterministic build context: fixed contents, modes and
# mtimes (touch -d @0), so `podman build --timestamp 0` gives the same image ID
# on every build from the same binary and CA bundle.
image-only:
	@test -x '$(IMAGE_BIN)' || { echo 'image: $(IMAGE_BIN) missing: run make static' >&2; exit 1; }
	@test -r '$(CA_BUNDLE)' || { echo 'image: $(CA_BUNDLE) missing: apt-get install ca-certificates' >&2; exit 1; }
	rm -rf '$(IMAGE_CONTEXT)'
	mkdir -p '$(IMAGE_CONTEXT)/srv/mc-proxy'
	install -m 0755 '$(IMAGE_BIN)' '$(IMAGE_CONTEXT)/mc-proxy'
	install -m 0644 '$(CA_BUNDLE)' '$(IMAGE_CONTEXT)/ca-certificates.crt'
	printf '%s\n' 'root:x:0:0:root:/:/sbin/nologin' \
	  'mcproxy:x:65532:65532:mc-proxy:/srv/mc-proxy:/sbin/nologin' > '$(IMAGE_CONTEXT)/passwd'
	printf '%s\n' 'root:x:0:' 'mcproxy:x:65532:' > '$(IMAGE_CONTEXT)/group'
	chmod 0644 '$(IMAGE_CONTEXT)/passwd' '$(IMAGE_CONTEXT)/group'
	chmod 0755 '$(IMAGE_CONTEXT)' '$(IMAGE_CONTEXT)/srv'
	chmod 0700 '$(IMAGE_CONTEXT)/srv/mc-proxy'
	find '$(IMAGE_CONTEXT)' -exec touch -h -d @0 {} +
	$(PODMAN) build --timestamp 0 $(PODMAN_BUILD_FLAGS) --build-arg VERSION=$(VERSION) \
	  -f Containerfile -t $(IMAGE) '$(IMAGE_CONTEXT)'
	@echo "image: $(IMAGE) $$($(PODMAN) image inspect --format '{{.Id}}' $(IMAGE))"

# Rebuild without the layer cache and compare image IDs, then run the image
# (--version, check on mc-proxy.toml.example) or, where containers cannot run
# here, fall back to inspecting its config and file list.
image-check: image ## rebuild the image (same ID?), inspect and run it
	@id1=$$($(PODMAN) image inspect --format '{{.Id}}' $(IMAGE)); \
	$(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) image-only \
	  IMAGE=$(IMAGE_NAME):reproducibility-check PODMAN_BUILD_FLAGS=--no-cache >/dev/null || exit 1; \
	id2=$$($(PODMAN) image inspect --format '{{.Id}}' $(IMAGE_NAME):reproducibility-check); \
	$(PODMAN) rmi $(IMAGE_NAME):reproducibility-check >/dev/null 2>&1 || true; \
	if [ "$$id1" = "$$id2" ]; then echo "PASS image reproducible: two builds -> $$id1"; \
	else echo "FAIL image reproducible: $$id1 != $$id2"; exit 1; fi
	PODMAN='$(PODMAN)' bash .ci/packaging-check.sh image-check '$(IMAGE)' '$(VERSION)'

packaging-check: ## lint/validate deploy/, nix/, Containerfile (.ci/packaging-check.sh)
	bash .ci/packaging-check.sh
