//! Code generated from `proto/mc_proxy/v1/admin.proto` by `build.rs`.

tonic::include_proto!("mc_proxy.v1");

/// The encoded descriptor set (with imports) that server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("admin_descriptor");
