//! Function length: every non-test function, with its line count.
//!
//! A function may be longer than the limit when the line right above its first attribute
//! or `fn` line is a `// long-fn: <reason>` comment: the reason is the written exception.

use std::path::{Path, PathBuf};

use syn::spanned::Spanned;
use syn::visit::Visit;

/// A function longer than allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongFn {
    pub file: PathBuf,
    pub name: String,
    pub line: usize,
    pub lines: usize,
}

/// Functions in `file` longer than `limit` lines without a `// long-fn:` reason.
pub fn long_functions(file: &Path, limit: usize) -> Result<Vec<LongFn>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let ast = syn::parse_file(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut v = FnCollector::default();
    v.visit_file(&ast);
    Ok(v.found
        .into_iter()
        .filter(|(_, start, end, first)| {
            let len = end + 1 - start;
            let excused = first
                .checked_sub(2)
                .and_then(|i| lines.get(i))
                .is_some_and(|l| l.trim_start().starts_with("// long-fn:"));
            len > limit && !excused
        })
        .map(|(name, start, end, _)| LongFn {
            file: file.to_path_buf(),
            name,
            line: start,
            lines: end + 1 - start,
        })
        .collect())
}

/// (name, first line of the signature, last line, first line including attributes/docs).
#[derive(Default)]
struct FnCollector {
    found: Vec<(String, usize, usize, usize)>,
}

impl FnCollector {
    fn record(
        &mut self,
        name: String,
        attrs: &[syn::Attribute],
        sig: &syn::Signature,
        whole: proc_macro2::Span,
    ) {
        let first = attrs
            .iter()
            .filter(|a| !matches!(a.style, syn::AttrStyle::Inner(_)))
            .map(|a| a.span().start().line)
            .min()
            .unwrap_or(sig.fn_token.span.start().line)
            .min(sig.fn_token.span.start().line);
        self.found.push((
            name,
            sig.fn_token.span.start().line,
            whole.end().line,
            first,
        ));
    }
}

impl<'ast> Visit<'ast> for FnCollector {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !crate::is_test_attr(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if crate::is_test_attr(&f.attrs) {
            return;
        }
        self.record(f.sig.ident.to_string(), &f.attrs, &f.sig, f.span());
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if crate::is_test_attr(&f.attrs) {
            return;
        }
        self.record(f.sig.ident.to_string(), &f.attrs, &f.sig, f.span());
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if f.default.is_some() {
            self.record(f.sig.ident.to_string(), &f.attrs, &f.sig, f.span());
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}
