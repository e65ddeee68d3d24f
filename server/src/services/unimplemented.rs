//! The services whose issues have not landed yet (Cluster, Auth). Every RPC answers gRPC `Unimplemented` with
//! the RPC's name — never a fake success a client could mistake for etcd's answer.

use fetcd_proto::etcdserverpb as pb;
use tonic::Request;
use tonic::Response;
use tonic::Status;

/// A service with no implemented RPC yet.
#[derive(Debug, Clone, Default)]
pub struct Unimplemented;

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!("fetcd: {rpc} is not implemented yet"))
}

/// Implements a service trait whose every unary RPC answers `Unimplemented`; streaming RPCs
/// and associated types come in `extra`. (The whole impl is generated so `async_trait` sees the
/// expanded methods.)
macro_rules! unimplemented_service {
    ($trait:path { $($extra:item)* } $($name:ident($req:ident) -> $resp:ident;)*) => {
        #[tonic::async_trait]
        impl $trait for Unimplemented {
            $($extra)*
            $(
                async fn $name(&self, _: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                    Err(unimplemented(stringify!($name)))
                }
            )*
        }
    };
}

unimplemented_service! {
    pb::auth_server::Auth {}
    auth_enable(AuthEnableRequest) -> AuthEnableResponse;
    auth_disable(AuthDisableRequest) -> AuthDisableResponse;
    auth_status(AuthStatusRequest) -> AuthStatusResponse;
    authenticate(AuthenticateRequest) -> AuthenticateResponse;
    user_add(AuthUserAddRequest) -> AuthUserAddResponse;
    user_get(AuthUserGetRequest) -> AuthUserGetResponse;
    user_list(AuthUserListRequest) -> AuthUserListResponse;
    user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse;
    user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse;
    user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse;
    user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse;
    role_add(AuthRoleAddRequest) -> AuthRoleAddResponse;
    role_get(AuthRoleGetRequest) -> AuthRoleGetResponse;
    role_list(AuthRoleListRequest) -> AuthRoleListResponse;
    role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse;
    role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse;
    role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse;
}
