//! The participant side: the trait itself (async methods as `Send` futures) with the provided
//! method `into_participant`, which registers an implementation's operations, saga steps and message
//! actions on a participant.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, ReturnType, Type};

use crate::model::{INTO_PARTICIPANT, Method, Operation, SagaStep, Service, Store};

/// The request type of an operation: its one parameter's type, a tuple of several, or `()`.
pub fn request_type(m: &Method) -> TokenStream {
    match m.params.as_slice() {
        [one] => {
            let ty = &one.ty;
            quote!(#ty)
        }
        params => {
            let tys = params.iter().map(|p| &p.ty);
            quote!((#(#tys,)*))
        }
    }
}

/// The pattern that takes a decoded request apart, and the names it binds.
fn request_pattern(m: &Method) -> (TokenStream, Vec<Ident>) {
    let names: Vec<Ident> = (0..m.params.len()).map(|i| format_ident!("__tcc_arg{}", i)).collect();
    let pat = match names.as_slice() {
        [one] => quote!(#one),
        names => quote!((#(#names,)*)),
    };
    (pat, names)
}

/// One trait method, async made explicit: `fn m(..) -> impl Future<Output = R> + Send`.
fn method(m: &Method) -> TokenStream {
    let attrs = &m.attrs;
    let mut sig = m.sig.clone();
    sig.asyncness = None;
    let ret: Type = match &m.sig.output {
        ReturnType::Type(_, ty) => (**ty).clone(),
        ReturnType::Default => syn::parse_quote!(()),
    };
    sig.output = syn::parse_quote_spanned! {ret.span()=>
        -> impl ::core::future::Future<Output = #ret> + ::core::marker::Send
    };
    match &m.default {
        Some(body) => quote! { #(#attrs)* #sig { async move #body } },
        None => quote! { #(#attrs)* #sig; },
    }
}

/// The adapter of one operation: an `AsyncOperation` calling the implementation's methods.
fn adapter(s: &Service, op: &Operation, n: usize) -> (Ident, TokenStream) {
    let krate = &s.krate;
    let service = &s.item.ident;
    let name = format_ident!("__TccOperation{}", n);
    let (try_m, confirm, cancel) = (&s.methods[op.try_], &s.methods[op.confirm], &s.methods[op.cancel]);
    let request = request_type(try_m);
    let (pat, args) = request_pattern(try_m);
    let (ok, err) = (&try_m.ok, &try_m.err);
    let (try_fn, confirm_fn, cancel_fn) = (&try_m.sig.ident, &confirm.sig.ident, &cancel.sig.ident);
    let (operation_trait, ctx_ty, db) = match &s.store {
        Store::Sled => (quote!(AsyncOperation), quote!(#krate::__private::TccContext), quote!()),
        Store::Sql(db) => {
            (quote!(SqlOperation), quote!(&mut #krate::__private::SqlContext<#db>), quote!(type Db = #db;))
        }
    };
    let tokens = quote! {
        struct #name<__TccImpl>(::std::sync::Arc<__TccImpl>);

        impl<__TccImpl: #service> #krate::__private::#operation_trait for #name<__TccImpl> {
            #db
            type Request = #request;
            type Response = #ok;
            type Error = #err;

            fn try_(
                &self,
                ctx: #ctx_ty,
                request: Self::Request,
            ) -> impl ::core::future::Future<Output = ::core::result::Result<Self::Response, Self::Error>>
                   + ::core::marker::Send {
                let #pat = request;
                <__TccImpl as #service>::#try_fn(&*self.0, ctx, #(#args),*)
            }

            fn confirm(
                &self,
                ctx: #ctx_ty,
                request: Self::Request,
            ) -> impl ::core::future::Future<Output = ::core::result::Result<(), Self::Error>> + ::core::marker::Send {
                let #pat = request;
                <__TccImpl as #service>::#confirm_fn(&*self.0, ctx, #(#args),*)
            }

            fn cancel(
                &self,
                ctx: #ctx_ty,
                request: Self::Request,
            ) -> impl ::core::future::Future<Output = ::core::result::Result<(), Self::Error>> + ::core::marker::Send {
                let #pat = request;
                <__TccImpl as #service>::#cancel_fn(&*self.0, ctx, #(#args),*)
            }

            fn error_detail(error: &Self::Error) -> ::core::option::Option<#krate::__private::serde_json::Value> {
                #[allow(unused_imports)]
                use #krate::__private::{DetailBySerialize as _, NoDetail as _};
                (&#krate::__private::ErrorDetail(error)).detail()
            }
        }
    };
    (name, tokens)
}

/// The adapter of a saga step (`compensate: Some`) or a message action: an `AsyncAction` (and
/// `AsyncStep`), or their SQL twins, calling the implementation's methods.
fn step_adapter(s: &Service, action: usize, compensate: Option<usize>, name: &Ident) -> TokenStream {
    let krate = &s.krate;
    let service = &s.item.ident;
    let action_m = &s.methods[action];
    let request = request_type(action_m);
    let (pat, args) = request_pattern(action_m);
    let err = &action_m.err;
    let action_fn = &action_m.sig.ident;
    let (action_trait, step_trait, ctx_ty, db) = match &s.store {
        Store::Sled => {
            (quote!(AsyncAction), quote!(AsyncStep), quote!(#krate::__private::TccContext), quote!())
        }
        Store::Sql(db) => (
            quote!(SqlAction),
            quote!(SqlStep),
            quote!(&mut #krate::__private::SqlContext<#db>),
            quote!(type Db = #db;),
        ),
    };
    let step_impl = compensate.map(|c| {
        let compensate_fn = &s.methods[c].sig.ident;
        quote! {
            impl<__TccImpl: #service> #krate::__private::#step_trait for #name<__TccImpl> {
                fn compensate(
                    &self,
                    ctx: #ctx_ty,
                    request: Self::Request,
                ) -> impl ::core::future::Future<Output = ::core::result::Result<(), Self::Error>> + ::core::marker::Send {
                    let #pat = request;
                    <__TccImpl as #service>::#compensate_fn(&*self.0, ctx, #(#args),*)
                }
            }
        }
    });
    quote! {
        struct #name<__TccImpl>(::std::sync::Arc<__TccImpl>);

        impl<__TccImpl: #service> #krate::__private::#action_trait for #name<__TccImpl> {
            #db
            type Request = #request;
            type Error = #err;

            fn action(
                &self,
                ctx: #ctx_ty,
                request: Self::Request,
            ) -> impl ::core::future::Future<Output = ::core::result::Result<(), Self::Error>> + ::core::marker::Send {
                let #pat = request;
                <__TccImpl as #service>::#action_fn(&*self.0, ctx, #(#args),*)
            }

            fn error_detail(error: &Self::Error) -> ::core::option::Option<#krate::__private::serde_json::Value> {
                #[allow(unused_imports)]
                use #krate::__private::{DetailBySerialize as _, NoDetail as _};
                (&#krate::__private::ErrorDetail(error)).detail()
            }
        }

        #step_impl
    }
}

fn operations_table(s: &Service) -> Vec<String> {
    let mut lines = vec![
        String::new(),
        "# TCC operations".to_owned(),
        String::new(),
        "`#[tcc]` made this trait the definition of a TCC service.".to_owned(),
    ];
    if !s.ops.is_empty() {
        lines.extend([
            String::new(),
            "| operation (try) | confirm | cancel | client's default branch |".to_owned(),
            "|---|---|---|---|".to_owned(),
        ]);
    }
    for op in &s.ops {
        lines.push(format!(
            "| `{}` | `{}` | `{}` | `{}` |",
            s.methods[op.try_].name(),
            s.methods[op.confirm].name(),
            s.methods[op.cancel].name(),
            op.branch
        ));
    }
    if !s.steps.is_empty() {
        lines.extend([
            String::new(),
            "| saga step (action) | compensation |".to_owned(),
            "|---|---|".to_owned(),
        ]);
    }
    for step in &s.steps {
        lines.push(format!(
            "| `{}` | `{}` |",
            s.methods[step.action].name(),
            s.methods[step.compensate].name()
        ));
    }
    if !s.actions.is_empty() {
        let names: Vec<String> = s.actions.iter().map(|&a| format!("`{}`", s.methods[a].name())).collect();
        lines.extend([String::new(), format!("Message actions: {}.", names.join(", "))]);
    }
    let client = &s.client;
    let service = &s.item.ident;
    lines.extend([
        String::new(),
        format!(
            "A participant serves an implementation with [`{service}::{INTO_PARTICIPANT}`]; an initiator calls it \
             with [`{client}`]. Implement the methods with `async fn`: their futures must be `Send`, and \
             their effects go through the context they get (`TccContext` or `SqlContext`), which commits them \
             together with the participant's barrier record."
        ),
    ]);
    lines
}

/// The trait, rewritten.
pub fn render(s: &Service) -> TokenStream {
    let krate = &s.krate;
    let item = &s.item;
    let (attrs, vis, trait_token, ident) = (&item.attrs, &item.vis, &item.trait_token, &item.ident);
    let supertraits = item.supertraits.iter();
    let docs = operations_table(s);
    let methods = s.methods.iter().map(method);
    let adapters: Vec<(Ident, TokenStream)> =
        s.ops.iter().enumerate().map(|(n, op)| adapter(s, op, n)).collect();
    let adapter_items = adapters.iter().map(|(_, tokens)| tokens);
    let registrations = s.ops.iter().zip(&adapters).map(|(op, (name, _))| {
        let op_name = s.methods[op.try_].name();
        match &s.store {
            Store::Sled => quote!(.async_operation(#op_name, #name(::core::clone::Clone::clone(&this)))),
            Store::Sql(_) => quote!(.sql_operation(#op_name, #name(::core::clone::Clone::clone(&this)))),
        }
    });
    let step_adapters: Vec<(Ident, TokenStream)> = s
        .steps
        .iter()
        .enumerate()
        .map(|(n, SagaStep { action, compensate })| {
            let name = format_ident!("__TccStep{}", n);
            let tokens = step_adapter(s, *action, Some(*compensate), &name);
            (name, tokens)
        })
        .collect();
    let action_adapters: Vec<(Ident, TokenStream)> = s
        .actions
        .iter()
        .enumerate()
        .map(|(n, &action)| {
            let name = format_ident!("__TccAction{}", n);
            let tokens = step_adapter(s, action, None, &name);
            (name, tokens)
        })
        .collect();
    let step_items = step_adapters.iter().chain(&action_adapters).map(|(_, tokens)| tokens);
    let (step_fn, action_fn) = match &s.store {
        Store::Sled => (quote!(async_step), quote!(async_action)),
        Store::Sql(_) => (quote!(sql_step), quote!(sql_action)),
    };
    let step_registrations = s.steps.iter().zip(&step_adapters).map(|(step, (name, _))| {
        let step_name = s.methods[step.action].name();
        quote!(.#step_fn(#step_name, #name(::core::clone::Clone::clone(&this))))
    });
    let action_registrations = s.actions.iter().zip(&action_adapters).map(|(&action, (name, _))| {
        let action_name = s.methods[action].name();
        quote!(.#action_fn(#action_name, #name(::core::clone::Clone::clone(&this))))
    });
    let listed = |names: Vec<String>| if names.is_empty() { "none".to_owned() } else { names.join(", ") };
    let op_names = listed(s.ops.iter().map(|op| format!("`{}`", s.methods[op.try_].name())).collect());
    let step_names = listed(s.steps.iter().map(|st| format!("`{}`", s.methods[st.action].name())).collect());
    let action_names = listed(s.actions.iter().map(|&a| format!("`{}`", s.methods[a].name())).collect());
    let into_doc = format!(
        "Adds this implementation to `participant`, under wherever the participant's router is nested, \
         through its barrier: each TCC operation ({op_names}) served at `/{{operation}}/try`, `/confirm` and \
         `/cancel`; each saga step ({step_names}) at `/{{step}}/action` and `/compensate`; each message \
         action ({action_names}) at `/{{action}}/action`. Generated by `#[tcc]`."
    );
    let into = format_ident!("{}", INTO_PARTICIPANT);
    let participant = match &s.store {
        Store::Sled => quote!(#krate::__private::Participant),
        // Spanned at the methods' context type: a participant of another store is a type error there.
        Store::Sql(db) => {
            quote_spanned!(db.span()=> #krate::__private::Participant<#krate::__private::Sql<#db>>)
        }
    };
    quote! {
        #(#attrs)*
        #(#[doc = #docs])*
        #vis #trait_token #ident: #(#supertraits +)* ::core::marker::Send + ::core::marker::Sync + 'static {
            #(#methods)*

            // Only when tcc-http serves participants (its `participant` feature).
            #krate::__private::participant_side! {
                #[doc = #into_doc]
                fn #into(self, participant: #participant) -> #participant
                where
                    Self: ::core::marker::Sized,
                {
                    #(#adapter_items)*
                    #(#step_items)*
                    let this = ::std::sync::Arc::new(self);
                    participant #(#registrations)* #(#step_registrations)* #(#action_registrations)*
                }
            }
        }
    }
}
