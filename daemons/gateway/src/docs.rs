//! `/openapi.json` and the Swagger UI, embedded at build time (no network access at build
//! or run time, SPEC §2).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use taskflow_kit::web::{problem, Resp};

use crate::middleware::method_not_allowed;

pub const OPENAPI: &str = include_str!("../openapi.json");

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/swagger/index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../assets/swagger/index.html"),
    },
    Asset {
        path: "/swagger/swagger-ui.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/swagger/swagger-ui.css"),
    },
    Asset {
        path: "/swagger/swagger-ui-bundle.js",
        content_type: "application/javascript; charset=utf-8",
        body: include_bytes!("../assets/swagger/swagger-ui-bundle.js"),
    },
    Asset {
        path: "/swagger/swagger-ui-standalone-preset.js",
        content_type: "application/javascript; charset=utf-8",
        body: include_bytes!("../assets/swagger/swagger-ui-standalone-preset.js"),
    },
    Asset {
        path: "/swagger/swagger-initializer.js",
        content_type: "application/javascript; charset=utf-8",
        body: include_bytes!("../assets/swagger/swagger-initializer.js"),
    },
    Asset {
        path: "/swagger/favicon-32x32.png",
        content_type: "image/png",
        body: include_bytes!("../assets/swagger/favicon-32x32.png"),
    },
];

/// `/openapi.json` and the embedded Swagger UI.
pub fn static_route(path: &str, method: &Method) -> Option<Resp> {
    let serve = |ct: &'static str, body: &'static [u8]| {
        let mut r = Response::new(Full::new(Bytes::from_static(body)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        r
    };
    let found = if path == "/openapi.json" {
        Some(serve("application/json", OPENAPI.as_bytes()))
    } else if path == "/swagger" || path == "/swagger/" {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
        r.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_static("/swagger/index.html"),
        );
        Some(r)
    } else {
        ASSETS
            .iter()
            .find(|a| a.path == path)
            .map(|a| serve(a.content_type, a.body))
    }?;
    if *method != Method::GET && *method != Method::HEAD {
        return Some(method_not_allowed("GET"));
    }
    Some(found)
}

/// Any docs path: its asset, or 404.
pub fn serve(path: &str, method: &Method) -> Resp {
    static_route(path, method).unwrap_or_else(|| problem(StatusCode::NOT_FOUND, "no such route"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_is_json_and_covers_routes() {
        let v: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
        assert_eq!(v["openapi"], "3.1.0");
        for p in [
            "/",
            "/auth/register",
            "/auth/login",
            "/auth/me",
            "/auth/users",
            "/auth/users/{id}",
            "/tasks",
            "/tasks/{id}",
            "/healthz",
        ] {
            assert!(v["paths"].get(p).is_some(), "{p} missing from openapi.json");
        }
    }
}
