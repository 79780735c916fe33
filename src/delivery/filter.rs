//! Endpoint filters in CEL: which events an endpoint receives, beyond its event types.
//!
//! A filter is a [CEL](https://cel.dev) expression over one variable, `event`, with two fields:
//! `event.type` (a string) and `event.data` (the event's JSON object). It is compiled when it is
//! written ([`Filter::compile`]): a syntax error, a reference to anything but `event`, an unknown
//! function, an operation whose operand types can never match, or a result that cannot be a bool
//! is refused with its line and column. A filter is also refused when written if its estimated
//! cost on the largest event is over [`MAX_COST`] ([`estimated_cost`]): evaluation is never cut
//! short, because a filter that is accepted is bounded by construction.
//!
//! At ingest, [`Filter::evaluate`] runs the compiled program on an [`EventInput`] built once per
//! event. The rule for everything that is not a clean `true`: an evaluation error (a missing
//! field, a type mismatch on real data, a division by zero) and a non-bool result are *no match*,
//! reported as an [`EvalError`] whose [`EvalError::label`] is one of a fixed few (for a metric's
//! label). `has(event.data.x)` tests for a field without the error.
//!
//! Compiled filters are cached by [`FilterCache`] per endpoint version, so that ingest does not
//! parse a filter per event. Pure: no IO.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};
use cel::{Context, Env, ExecutionError, Program, Value};
use serde_json::Value as Json;

pub use crate::resources::MAX_FILTER_LENGTH;

/// Most estimated evaluation steps a filter may cost on the largest event ([`estimated_cost`]).
/// About a millisecond of evaluation on one core.
pub const MAX_COST: u64 = 1_000_000;

/// The event size the cost estimate assumes: the ingest port's default body limit. A string of
/// the event is at most this many bytes, a list at most half as many elements (`[0,0,...]`).
pub const ASSUMED_EVENT_BYTES: u64 = 64 * 1024;

/// Elements of the longest list an event of [`ASSUMED_EVENT_BYTES`] can hold.
const ASSUMED_LIST_LENGTH: u64 = ASSUMED_EVENT_BYTES / 2;

/// Longest event type (the validation of event types), the size of `event.type`.
const EVENT_TYPE_BYTES: u64 = crate::resources::MAX_EVENT_TYPE_LENGTH as u64;

/// A regular expression is compiled at each `matches` call: its cost beside the scan.
const REGEX_COMPILE_COST: u64 = 10_000;

/// Why a filter is refused when written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Over [`MAX_FILTER_LENGTH`].
    #[error("filter is longer than {MAX_FILTER_LENGTH} characters")]
    TooLong,
    /// Not CEL.
    #[error("filter has a syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// CEL, but not a filter: unknown names or functions, impossible operand types, or a result
    /// that cannot be a bool.
    #[error("filter has a type error at line {line}, column {column}: {message}")]
    Type {
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Estimated over [`MAX_COST`].
    #[error(
        "filter is too costly: an estimated {estimate} evaluation steps on a {ASSUMED_EVENT_BYTES}-byte event, over the limit of {MAX_COST} (a comprehension multiplies the cost of its body by the length of the list it runs over)"
    )]
    TooCostly {
        /// The estimate.
        estimate: u64,
    },
}

/// Why an evaluation did not give `true` or `false`: the filter then does not match.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// A field or key the expression reads is not in the event.
    #[error("no such field: {0}")]
    MissingField(String),
    /// An operator or function met values of types it has no overload for.
    #[error("type mismatch: {0}")]
    Type(String),
    /// The expression gave something other than a bool.
    #[error("the filter gave a {0}, not a bool")]
    NotBool(&'static str),
    /// Anything else (division by zero, overflow, a bad regular expression, ...).
    #[error("{0}")]
    Other(String),
}

impl EvalError {
    /// One of a fixed few names, for a metric's label.
    pub fn label(&self) -> &'static str {
        match self {
            EvalError::MissingField(_) => "missing_field",
            EvalError::Type(_) => "type",
            EvalError::NotBool(_) => "not_bool",
            EvalError::Other(_) => "other",
        }
    }
}

/// A compiled filter.
#[derive(Debug)]
pub struct Filter {
    program: Program,
}

/// The environment filters are compiled and evaluated in: the standard library and macros,
/// without the optional syntax (`a.?b`).
fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib().with_optional_support(false)))
}

impl Filter {
    /// Parses, checks and estimates `source` (see the module's documentation).
    pub fn compile(source: &str) -> Result<Filter, FilterError> {
        if source.chars().count() > MAX_FILTER_LENGTH {
            return Err(FilterError::TooLong);
        }
        let program = env().compile(source).map_err(|errors| {
            let first = errors.errors.first();
            let (line, column) = first.map(|e| e.pos).unwrap_or((1, 0));
            FilterError::Syntax {
                line: line.max(1) as usize,
                // The parser's columns are 1-based already.
                column: column.max(1) as usize,
                message: first
                    .map(|e| e.msg.clone())
                    .unwrap_or_else(|| "not an expression".into()),
            }
        })?;
        let root = program.expression();
        let at = |id: u64, message: String| {
            let offset = program.source_info().offset_for(id).map(|(start, _)| start as usize);
            let (line, column) = line_column(source, offset.unwrap_or(0));
            FilterError::Type { line, column, message }
        };
        let mut scope = Vec::new();
        let ty = check(root, &mut scope).map_err(|(id, message)| at(id, message))?;
        if !matches!(ty, Ty::Bool | Ty::Dyn) {
            return Err(at(
                root.id,
                format!("a filter must give a bool, and this one gives a {}", ty.name()),
            ));
        }
        let estimate = estimated_cost(root);
        if estimate > MAX_COST {
            return Err(FilterError::TooCostly { estimate });
        }
        Ok(Filter { program })
    }

    /// Whether the event matches: `Ok(true)` only for a `true` result (see [`EvalError`]).
    pub fn evaluate(&self, event: &EventInput) -> Result<bool, EvalError> {
        let mut context = Context::with_env(Arc::clone(env()));
        context.add_variable_from_value("event", event.value.clone());
        match self.program.execute(&context) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(EvalError::NotBool(type_name(&other))),
            Err(e) => Err(eval_error(e)),
        }
    }
}

/// 1-based line and column (in characters) of a character offset.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let (mut line, mut column) = (1, 1);
    for c in source.chars().take(offset) {
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

fn eval_error(e: ExecutionError) -> EvalError {
    match e {
        ExecutionError::NoSuchKey(key) => EvalError::MissingField(key.to_string()),
        e @ (ExecutionError::NoSuchOverload(_)
        | ExecutionError::UnexpectedType { .. }
        | ExecutionError::ValuesNotComparable(..)
        | ExecutionError::UnsupportedBinaryOperator(..)
        | ExecutionError::UnsupportedTargetType { .. }
        | ExecutionError::NotSupportedAsMethod { .. }) => EvalError::Type(e.to_string()),
        e => EvalError::Other(e.to_string()),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::List(_) => "list",
        Value::Map(_) => "map",
        Value::Int(_) => "int",
        Value::UInt(_) => "uint",
        Value::Float(_) => "double",
        Value::String(_) => "string",
        Value::Bytes(_) => "bytes",
        Value::Bool(_) => "bool",
        Value::Null => "null",
        _ => "value",
    }
}

/// An event as filters see it: `{"type": ..., "data": ...}`, converted once per event.
#[derive(Debug, Clone)]
pub struct EventInput {
    value: Value,
}

impl EventInput {
    /// The input of an event of `event_type` with `data`.
    pub fn new(event_type: &str, data: &Json) -> EventInput {
        let mut fields = HashMap::new();
        fields.insert(cel::objects::Key::from("type".to_string()), Value::from(event_type));
        fields.insert(cel::objects::Key::from("data".to_string()), json_value(data));
        EventInput {
            value: Value::Map(cel::objects::Map { map: Arc::new(fields) }),
        }
    }
}

/// JSON to CEL: integers that fit are `int` (so `event.data.n > 3` compares ints), larger ones
/// `uint`, the others `double`.
fn json_value(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(json_value).collect())),
        Json::Object(fields) => Value::Map(cel::objects::Map {
            map: Arc::new(
                fields
                    .iter()
                    .map(|(k, v)| (cel::objects::Key::from(k.clone()), json_value(v)))
                    .collect(),
            ),
        }),
    }
}

/// What the checker knows of an expression's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Null,
    List,
    Map,
    /// `event` itself.
    Event,
    /// Known only at evaluation (event data, comprehension variables).
    Dyn,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Int => "int",
            Ty::Uint => "uint",
            Ty::Double => "double",
            Ty::String => "string",
            Ty::Bytes => "bytes",
            Ty::Null => "null",
            Ty::List => "list",
            Ty::Map | Ty::Event => "map",
            Ty::Dyn => "dyn",
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Ty::Int | Ty::Uint | Ty::Double)
    }

    /// Whether a value of this type may be of `want` at evaluation.
    fn may_be(self, want: Ty) -> bool {
        self == Ty::Dyn || self == want || (want == Ty::Map && self == Ty::Event)
    }
}

/// Names an identifier may have besides `event` and comprehension variables: CEL's type names,
/// for `type(x) == string`.
const TYPE_NAMES: [&str; 10] = [
    "bool",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

type CheckError = (u64, String);

/// Infers what can be known of `e`'s type and refuses what can never evaluate.
fn check(e: &IdedExpr, scope: &mut Vec<String>) -> Result<Ty, CheckError> {
    let fail = |message: String| Err((e.id, message));
    match &e.expr {
        Expr::Literal(literal) => Ok(match literal {
            LiteralValue::Boolean(_) => Ty::Bool,
            LiteralValue::Bytes(_) => Ty::Bytes,
            LiteralValue::Double(_) => Ty::Double,
            LiteralValue::Int(_) => Ty::Int,
            LiteralValue::Null => Ty::Null,
            LiteralValue::String(_) => Ty::String,
            LiteralValue::UInt(_) => Ty::Uint,
        }),
        Expr::Ident(name) if name == "event" && !scope.contains(name) => Ok(Ty::Event),
        Expr::Ident(name) if scope.contains(name) || TYPE_NAMES.contains(&name.as_str()) => Ok(Ty::Dyn),
        Expr::Ident(name) => fail(format!(
            "undeclared reference to '{name}' (a filter reads `event.type` and `event.data`)"
        )),
        Expr::Select(select) => {
            let operand = check(&select.operand, scope)?;
            match operand {
                Ty::Event if select.field != "type" && select.field != "data" => fail(format!(
                    "event has no field '{}': it has `type` and `data`",
                    select.field
                )),
                _ if select.test => Ok(Ty::Bool),
                Ty::Event if select.field == "type" => Ok(Ty::String),
                Ty::Event => Ok(Ty::Map),
                Ty::Map | Ty::Dyn => Ok(Ty::Dyn),
                other => fail(format!(
                    "a {} has no fields (selecting '{}')",
                    other.name(),
                    select.field
                )),
            }
        }
        Expr::List(list) => {
            for element in &list.elements {
                check(element, scope)?;
            }
            Ok(Ty::List)
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(entry) = &entry.expr {
                    check(&entry.key, scope)?;
                    check(&entry.value, scope)?;
                }
            }
            Ok(Ty::Map)
        }
        Expr::Struct(s) => fail(format!("message '{}' cannot be built in a filter", s.type_name)),
        Expr::Unspecified => fail("incomplete expression".into()),
        Expr::Comprehension(c) => {
            let range = check(&c.iter_range, scope)?;
            if !(range.may_be(Ty::List) || range.may_be(Ty::Map)) {
                return Err((c.iter_range.id, format!("cannot iterate over a {}", range.name())));
            }
            let init = check(&c.accu_init, scope)?;
            let pushed = 2 + usize::from(c.iter_var2.is_some());
            scope.push(c.iter_var.clone());
            scope.extend(c.iter_var2.clone());
            scope.push(c.accu_var.clone());
            let body = check(&c.loop_cond, scope)
                .and_then(|_| check(&c.loop_step, scope))
                .and_then(|_| check(&c.result, scope));
            scope.truncate(scope.len() - pushed);
            let result = body?;
            // The standard macros return their accumulator: its type is the initial value's.
            Ok(match &c.result.expr {
                Expr::Ident(name) if *name == c.accu_var => init,
                _ => result,
            })
        }
        Expr::Call(call) => {
            let target = call.target.as_deref().map(|t| check(t, scope)).transpose()?;
            let args = call
                .args
                .iter()
                .map(|a| check(a, scope))
                .collect::<Result<Vec<_>, _>>()?;
            call_type(&call.func_name, target, &args).map_err(|m| (e.id, m))
        }
    }
}

/// The result type of a call, or why it can never succeed.
fn call_type(name: &str, target: Option<Ty>, args: &[Ty]) -> Result<Ty, String> {
    let no_overload = |types: &[Ty]| {
        let shown: Vec<_> = types.iter().map(|t| t.name()).collect();
        Err(format!(
            "no matching overload for '{}' applied to ({})",
            display_name(name),
            shown.join(", ")
        ))
    };
    let arity = |n: usize| -> Result<(), String> {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!(
                "'{}' takes {n} argument(s), not {}",
                display_name(name),
                args.len()
            ))
        }
    };
    match (name, target) {
        (
            operators::LOGICAL_AND | operators::LOGICAL_OR | operators::LOGICAL_NOT | operators::NOT_STRICTLY_FALSE,
            None,
        ) => {
            if args.iter().all(|a| a.may_be(Ty::Bool)) {
                Ok(Ty::Bool)
            } else {
                no_overload(args)
            }
        }
        (operators::EQUALS | operators::NOT_EQUALS, None) => {
            let (a, b) = (args[0], args[1]);
            let comparable = a == Ty::Dyn
                || b == Ty::Dyn
                || a == Ty::Null
                || b == Ty::Null
                || a.name() == b.name()
                || (a.numeric() && b.numeric());
            if comparable { Ok(Ty::Bool) } else { no_overload(args) }
        }
        (operators::LESS | operators::LESS_EQUALS | operators::GREATER | operators::GREATER_EQUALS, None) => {
            let orderable = |t: Ty| {
                matches!(
                    t,
                    Ty::Dyn | Ty::Int | Ty::Uint | Ty::Double | Ty::String | Ty::Bytes | Ty::Bool
                )
            };
            let (a, b) = (args[0], args[1]);
            let ok = orderable(a)
                && orderable(b)
                && (a == Ty::Dyn || b == Ty::Dyn || a == b || (a.numeric() && b.numeric()));
            if ok { Ok(Ty::Bool) } else { no_overload(args) }
        }
        (operators::ADD, None) => {
            let (a, b) = (args[0], args[1]);
            let addable = |t: Ty| {
                matches!(
                    t,
                    Ty::Dyn | Ty::Int | Ty::Uint | Ty::Double | Ty::String | Ty::Bytes | Ty::List
                )
            };
            if !(addable(a) && addable(b)) || (a != Ty::Dyn && b != Ty::Dyn && a != b) {
                return no_overload(args);
            }
            Ok(if a == Ty::Dyn { b } else { a })
        }
        (operators::SUBSTRACT | operators::MULTIPLY | operators::DIVIDE | operators::MODULO, None) => {
            let (a, b) = (args[0], args[1]);
            let ok = (a.numeric() || a == Ty::Dyn)
                && (b.numeric() || b == Ty::Dyn)
                && (a == Ty::Dyn || b == Ty::Dyn || a == b);
            if !ok {
                return no_overload(args);
            }
            Ok(if a == Ty::Dyn { b } else { a })
        }
        (operators::NEGATE, None) if args[0].numeric() || args[0] == Ty::Dyn => Ok(args[0]),
        (operators::NEGATE, None) => no_overload(args),
        (operators::INDEX, None) => {
            if args[0].may_be(Ty::List) || args[0].may_be(Ty::Map) {
                Ok(Ty::Dyn)
            } else {
                no_overload(args)
            }
        }
        (operators::IN, None) => {
            if args[1].may_be(Ty::List) || args[1].may_be(Ty::Map) {
                Ok(Ty::Bool)
            } else {
                no_overload(args)
            }
        }
        (operators::CONDITIONAL, None) => {
            if !args[0].may_be(Ty::Bool) {
                return no_overload(args);
            }
            Ok(if args[1] == args[2] { args[1] } else { Ty::Dyn })
        }
        ("size", _) => {
            let subject = match target {
                Some(t) => {
                    arity(0)?;
                    t
                }
                None => {
                    arity(1)?;
                    args[0]
                }
            };
            let sized = [Ty::String, Ty::Bytes, Ty::List, Ty::Map];
            if sized.iter().any(|s| subject.may_be(*s)) {
                Ok(Ty::Int)
            } else {
                no_overload(&[subject])
            }
        }
        ("startsWith" | "endsWith" | "contains" | "matches", Some(t)) => {
            arity(1)?;
            if t.may_be(Ty::String) && args[0].may_be(Ty::String) {
                Ok(Ty::Bool)
            } else {
                no_overload(&[t, args[0]])
            }
        }
        ("int" | "uint" | "double" | "string" | "bool" | "bytes" | "dyn" | "type", None) => {
            arity(1)?;
            Ok(match name {
                "int" => Ty::Int,
                "uint" => Ty::Uint,
                "double" => Ty::Double,
                "string" => Ty::String,
                "bool" => Ty::Bool,
                "bytes" => Ty::Bytes,
                _ => Ty::Dyn,
            })
        }
        (_, Some(_)) => Err(format!("unknown method '{name}'")),
        (_, None) => Err(format!("unknown function '{name}'")),
    }
}

/// How an operator is written, for messages.
fn display_name(name: &str) -> &str {
    match name {
        operators::LOGICAL_AND => "&&",
        operators::LOGICAL_OR => "||",
        operators::LOGICAL_NOT => "!",
        operators::EQUALS => "==",
        operators::NOT_EQUALS => "!=",
        operators::LESS => "<",
        operators::LESS_EQUALS => "<=",
        operators::GREATER => ">",
        operators::GREATER_EQUALS => ">=",
        operators::ADD => "+",
        operators::SUBSTRACT | operators::NEGATE => "-",
        operators::MULTIPLY => "*",
        operators::DIVIDE => "/",
        operators::MODULO => "%",
        operators::INDEX => "[]",
        operators::IN => "in",
        operators::CONDITIONAL => "?:",
        other => other,
    }
}

/// The estimated evaluation steps of a filter on a [`ASSUMED_EVENT_BYTES`]-byte event.
///
/// Every node is a step each time it is evaluated. An operation whose time grows with its
/// operands (`contains`, `startsWith`, `endsWith`, `matches`, `+` of strings or lists, `==`, `!=`
/// and `in`) adds the size its operands can have: a string or list of the event counts
/// [`ASSUMED_EVENT_BYTES`]; `==`, `!=`, `startsWith` and `endsWith` with a literal operand stop
/// within the literal, so they add its length. A comprehension (`exists`, `all`, `exists_one`,
/// `map`, `filter`) multiplies its body by the longest list an event can hold, except for these
/// size costs on its own variable: the elements of one list share the event's bytes, so those are
/// counted once for the whole loop.
pub fn estimated_cost(root: &IdedExpr) -> u64 {
    let (per_evaluation, amortized) = cost(root, None);
    per_evaluation.saturating_add(amortized)
}

/// `(steps per evaluation, size costs on `loop_var` counted once per loop)`.
fn cost(e: &IdedExpr, loop_var: Option<&str>) -> (u64, u64) {
    match &e.expr {
        Expr::Comprehension(c) => {
            let (range, range_amortized) = cost(&c.iter_range, loop_var);
            let (init, init_amortized) = cost(&c.accu_init, loop_var);
            let (cond, cond_amortized) = cost(&c.loop_cond, Some(&c.iter_var));
            let (step, step_amortized) = cost(&c.loop_step, Some(&c.iter_var));
            let (result, result_amortized) = cost(&c.result, loop_var);
            let body = cond.saturating_add(step).saturating_mul(ASSUMED_LIST_LENGTH);
            let per = [1, range, init, body, cond_amortized, step_amortized, result]
                .into_iter()
                .fold(0u64, u64::saturating_add);
            (
                per,
                range_amortized
                    .saturating_add(init_amortized)
                    .saturating_add(result_amortized),
            )
        }
        Expr::Call(call) => {
            let mut per = 1u64;
            let mut amortized = 0u64;
            let operands: Vec<&IdedExpr> = call.target.as_deref().into_iter().chain(call.args.iter()).collect();
            for operand in &operands {
                let (p, a) = cost(operand, loop_var);
                per = per.saturating_add(p);
                amortized = amortized.saturating_add(a);
            }
            if bounded_by_shortest(&call.func_name, call.target.is_some())
                && let Some(shortest) = operands.iter().filter(|o| is_literal(o)).map(|o| operand_size(o)).min()
            {
                // Equality and prefix tests stop within the literal's length.
                per = per.saturating_add(shortest);
            } else if sized_operation(&call.func_name, call.target.is_some())
                && !(call.func_name == operators::ADD && operands.iter().any(|o| is_number(o)))
            {
                // (`+` with a number is arithmetic: constant time.)
                for operand in &operands {
                    let size = operand_size(operand);
                    if loop_var.is_some() && root_name(operand) == loop_var {
                        amortized = amortized.saturating_add(size);
                    } else {
                        per = per.saturating_add(size);
                    }
                }
                if call.func_name == "matches" {
                    per = per.saturating_add(REGEX_COMPILE_COST);
                }
            }
            (per, amortized)
        }
        Expr::Select(select) => {
            let (p, a) = cost(&select.operand, loop_var);
            (p.saturating_add(1), a)
        }
        Expr::List(list) => list
            .elements
            .iter()
            .fold((1, 0), |acc, element| add(acc, cost(element, loop_var))),
        Expr::Map(map) => map.entries.iter().fold((1, 0), |acc, entry| match &entry.expr {
            EntryExpr::MapEntry(entry) => add(add(acc, cost(&entry.key, loop_var)), cost(&entry.value, loop_var)),
            EntryExpr::StructField(field) => add(acc, cost(&field.value, loop_var)),
        }),
        _ => (1, 0),
    }
}

fn add(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0.saturating_add(b.0), a.1.saturating_add(b.1))
}

/// Whether a call's time is bounded by its shortest operand (equality, prefixes and suffixes).
fn bounded_by_shortest(name: &str, method: bool) -> bool {
    match name {
        operators::EQUALS | operators::NOT_EQUALS => true,
        "startsWith" | "endsWith" => method,
        _ => false,
    }
}

/// A literal scalar (its size is known when written).
fn is_literal(e: &IdedExpr) -> bool {
    matches!(e.expr, Expr::Literal(_))
}

/// A literal number.
fn is_number(e: &IdedExpr) -> bool {
    matches!(
        e.expr,
        Expr::Literal(LiteralValue::Int(_) | LiteralValue::UInt(_) | LiteralValue::Double(_))
    )
}

/// Whether a call's time grows with the size of its operands.
fn sized_operation(name: &str, method: bool) -> bool {
    match name {
        operators::ADD | operators::EQUALS | operators::NOT_EQUALS | operators::IN => true,
        "contains" | "startsWith" | "endsWith" | "matches" => method,
        _ => false,
    }
}

/// How large an operand can be: a literal's own size, `event.type`'s bound, else the event's.
fn operand_size(e: &IdedExpr) -> u64 {
    match &e.expr {
        Expr::Literal(LiteralValue::String(s)) => s.inner().len() as u64,
        Expr::Literal(LiteralValue::Bytes(b)) => b.inner().len() as u64,
        Expr::Literal(_) => 1,
        Expr::Select(select)
            if select.field == "type" && matches!(&select.operand.expr, Expr::Ident(n) if n == "event") =>
        {
            EVENT_TYPE_BYTES
        }
        Expr::List(list) if list.elements.iter().all(|e| matches!(e.expr, Expr::Literal(_))) => {
            list.elements.iter().map(operand_size).sum::<u64>().max(1)
        }
        _ => ASSUMED_EVENT_BYTES,
    }
}

/// The identifier at the root of `a.b[c].d`, if any.
fn root_name(e: &IdedExpr) -> Option<&str> {
    match &e.expr {
        Expr::Ident(name) => Some(name),
        Expr::Select(select) => root_name(&select.operand),
        Expr::Call(call) if call.func_name == operators::INDEX => call.args.first().and_then(root_name),
        _ => None,
    }
}

/// Most filters [`FilterCache`] holds before it starts again from empty.
const FILTER_CACHE_CAPACITY: usize = 4096;

/// Compiled filters by their text, so that ingest compiles each version of an endpoint's filter
/// once, not once per event (endpoints with the same filter share it). Bounded: past
/// [`FILTER_CACHE_CAPACITY`] texts it is emptied, so filters no endpoint has any more go too.
#[derive(Default)]
pub struct FilterCache {
    compiled: Mutex<HashMap<String, Option<Arc<Filter>>>>,
}

impl FilterCache {
    /// The compiled filter of `source`. `None` when it does not compile: written past validation
    /// (by an operator of an older version, or with the API server's own checks only), such a
    /// filter matches nothing, and the endpoint's status says why.
    pub fn get(&self, source: &str) -> Option<Arc<Filter>> {
        let mut compiled = self.compiled.lock().expect("filter cache lock");
        if let Some(filter) = compiled.get(source) {
            return filter.clone();
        }
        if compiled.len() >= FILTER_CACHE_CAPACITY {
            compiled.clear();
        }
        let filter = Filter::compile(source).ok().map(Arc::new);
        compiled.insert(source.to_string(), filter.clone());
        filter
    }

    /// How many texts are held.
    pub fn len(&self) -> usize {
        self.compiled.lock().expect("filter cache lock").len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event() -> EventInput {
        EventInput::new(
            "database.backup.completed",
            &json!({
                "name": "orders-db",
                "region": "eu-west-1",
                "size_bytes": 5_000_000_000i64,
                "ratio": 0.75,
                "tags": ["prod", "critical"],
                "labels": {"team": "payments", "tier": "gold"},
                "replicas": [{"zone": "a", "healthy": true}, {"zone": "b", "healthy": false}],
                "note": null,
                "huge": 18_446_744_073_709_551_615u64
            }),
        )
    }

    /// The filter's answer on [`event`], compiled first.
    fn eval(source: &str) -> Result<bool, EvalError> {
        Filter::compile(source)
            .unwrap_or_else(|e| panic!("{source}: {e}"))
            .evaluate(&event())
    }

    fn assert_matches(cases: &[(&str, bool)]) {
        for (source, want) in cases {
            assert_eq!(eval(source), Ok(*want), "{source}");
        }
    }

    #[test]
    fn strings() {
        assert_matches(&[
            ("event.type == 'database.backup.completed'", true),
            ("event.type.startsWith('database.')", true),
            ("event.type.startsWith('billing.')", false),
            ("event.type.endsWith('.completed')", true),
            ("event.data.name.contains('orders')", true),
            ("event.data.name.contains('users')", false),
            ("event.data.region.matches('^eu-[a-z]+-[0-9]$')", true),
            ("event.data.region.matches('^us-')", false),
            ("size(event.data.name) == 9", true),
            ("event.data.name + '!' == 'orders-db!'", true),
            ("event.data.region < 'f'", true),
        ]);
    }

    #[test]
    fn numbers() {
        assert_matches(&[
            ("event.data.size_bytes > 1000000000", true),
            (
                "event.data.size_bytes >= 5000000000 && event.data.size_bytes <= 5000000000",
                true,
            ),
            ("event.data.size_bytes < 10", false),
            ("event.data.ratio > 0.5", true),
            ("event.data.ratio == 0.75", true),
            ("event.data.size_bytes * 2 == 10000000000", true),
            ("event.data.huge > 0u", true),
            ("-event.data.ratio < 0.0", true),
            // int and double compare with each other.
            ("event.data.ratio > 0", true),
            ("event.data.size_bytes > 1.5", true),
            ("event.data.size_bytes == 5000000000.0", true),
        ]);
    }

    #[test]
    fn maps_and_lists() {
        assert_matches(&[
            ("event.data.labels.team == 'payments'", true),
            ("event.data.labels['tier'] == 'gold'", true),
            ("'team' in event.data.labels", true),
            ("'owner' in event.data.labels", false),
            ("size(event.data.labels) == 2", true),
            ("'prod' in event.data.tags", true),
            ("'staging' in event.data.tags", false),
            ("size(event.data.tags) == 2", true),
            ("event.data.tags.exists(t, t == 'critical')", true),
            ("event.data.tags.all(t, t.size() > 3)", true),
            ("event.data.tags.exists_one(t, t.startsWith('p'))", true),
            ("event.data.replicas.exists(r, r.zone == 'b' && !r.healthy)", true),
            ("event.data.replicas.all(r, r.healthy)", false),
            ("event.data.tags[0] == 'prod'", true),
            ("event.data.note == null", true),
            ("event.type in ['database.backup.completed', 'database.created']", true),
        ]);
    }

    #[test]
    fn has_tests_presence() {
        assert_matches(&[
            ("has(event.data.labels)", true),
            ("has(event.data.labels.team)", true),
            ("has(event.data.owner)", false),
            ("has(event.data.labels.owner)", false),
            ("!has(event.data.owner) || event.data.owner == 'x'", true),
            ("has(event.data.owner) && event.data.owner == 'x'", false),
        ]);
    }

    #[test]
    fn missing_fields_are_no_match_and_say_which() {
        for source in [
            "event.data.owner == 'alice'",
            "event.data.labels.owner == 'alice'",
            "event.data.owner.size() > 0",
        ] {
            let got = eval(source);
            assert!(matches!(got, Err(EvalError::MissingField(_))), "{source}: {got:?}");
            assert_eq!(got.unwrap_err().label(), "missing_field");
        }
        // An index past the end is an error too: no match.
        assert!(eval("event.data.tags[5] == 'x'").is_err());
    }

    #[test]
    fn type_mismatches_on_real_data_are_no_match() {
        // The checker cannot know `event.data.name` is a string: the evaluation finds out.
        let got = eval("event.data.name > 3");
        assert!(matches!(got, Err(EvalError::Type(_))), "{got:?}");
        assert_eq!(got.unwrap_err().label(), "type");
    }

    #[test]
    fn a_non_bool_result_is_no_match() {
        // `event.data.name` could be a bool as far as the checker knows: it is a string.
        let got = eval("event.data.name");
        assert_eq!(got, Err(EvalError::NotBool("string")));
        assert_eq!(got.unwrap_err().label(), "not_bool");
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let err = Filter::compile("event.type == 'a' &&").unwrap_err();
        assert!(matches!(err, FilterError::Syntax { line: 1, .. }), "{err:?}");
        let err = Filter::compile("event.type ==").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("filter has a syntax error at line 1, column 14: "),
            "{err}"
        );
        let err = Filter::compile("event.type ==\n  'a' && )").unwrap_err();
        let FilterError::Syntax { line, column, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!((line, column), (2, 10), "the stray parenthesis");
        assert!(
            err.to_string()
                .starts_with("filter has a syntax error at line 2, column 10: "),
            "{err}"
        );
    }

    #[test]
    fn type_errors_have_a_position() {
        let cases = [
            ("event.kind == 'x'", 1, 6, "event has no field 'kind'"),
            ("events.type == 'x'", 1, 1, "undeclared reference to 'events'"),
            (
                "event.type == 1",
                1,
                12,
                "no matching overload for '==' applied to (string, int)",
            ),
            (
                "event.type",
                1,
                6,
                "a filter must give a bool, and this one gives a string",
            ),
            ("size(event.data) + 1", 1, 18, "gives a int"),
            ("event.type.frobnicate()", 1, 22, "unknown method 'frobnicate'"),
            ("frob(event.type)", 1, 5, "unknown function 'frob'"),
            (
                "1 + 'a' == 2",
                1,
                3,
                "no matching overload for '+' applied to (int, string)",
            ),
            ("event.type.size > 3", 1, 11, "a string has no fields"),
            ("(1).exists(x, x)", 1, 2, "cannot iterate over a int"),
            ("!event.type", 1, 1, "no matching overload for '!'"),
        ];
        for (source, line, column, message) in cases {
            let err = Filter::compile(source).unwrap_err();
            let FilterError::Type {
                line: l,
                column: c,
                message: m,
            } = &err
            else {
                panic!("{source}: {err:?}")
            };
            assert!(m.contains(message), "{source}: {m}");
            assert_eq!((*l, *c), (line, column), "{source}: {m}");
        }
    }

    #[test]
    fn a_comprehension_variable_shadows_nothing_outside_it() {
        assert!(Filter::compile("event.data.tags.exists(t, t == 'a') && t == 'b'").is_err());
        assert!(Filter::compile("event.data.tags.exists(event, event == 'a')").is_ok());
    }

    #[test]
    fn too_long_is_refused() {
        let long = format!("event.type == '{}'", "a".repeat(MAX_FILTER_LENGTH));
        assert_eq!(Filter::compile(&long).unwrap_err(), FilterError::TooLong);
    }

    #[test]
    fn cost_is_bounded_when_written() {
        // Linear in the event: accepted.
        for source in [
            "event.data.tags.exists(t, t.startsWith('p') && t.endsWith('d'))",
            "event.data.replicas.exists(r, r.zone == 'b' && r.healthy)",
            "event.data.name.contains('a') && event.data.region.matches('^eu-')",
        ] {
            let filter = Filter::compile(source);
            assert!(filter.is_ok(), "{source}: {filter:?}");
        }
        // Quadratic: a comprehension in a comprehension, or a scan of the whole event per element.
        for source in [
            "event.data.tags.exists(a, event.data.tags.exists(b, a == b))",
            "event.data.tags.exists(t, event.data.name.contains(t))",
            "event.data.tags.map(t, t + t).size() > 0",
        ] {
            let err = Filter::compile(source).unwrap_err();
            assert!(
                matches!(err, FilterError::TooCostly { estimate } if estimate > MAX_COST),
                "{source}: {err:?}"
            );
        }
        let err = Filter::compile("event.data.tags.exists(a, event.data.tags.exists(b, a == b))").unwrap_err();
        assert!(
            err.to_string().starts_with("filter is too costly: an estimated "),
            "{err}"
        );
    }

    #[test]
    fn estimates_grow_with_what_the_filter_reads() {
        let estimate = |s: &str| estimated_cost(Filter::compile(s).unwrap().program.expression());
        assert!(estimate("event.type.contains('a')") < estimate("event.data.name.contains('a')"));
        assert!(estimate("event.data.name == 'a'") < estimate("event.data.name.contains('a')"));
        assert!(estimate("event.data.name.contains('a')") < estimate("event.data.tags.exists(t, t.contains('a'))"));
        assert!(estimate("true") < 10);
    }

    #[test]
    fn the_cache_compiles_a_text_once() {
        let cache = FilterCache::default();
        let a = cache.get("event.type == 'a'").unwrap();
        let again = cache.get("event.type == 'a'").unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert!(
            cache.get("event.type ==").is_none(),
            "a filter that does not compile matches nothing"
        );
        assert_eq!(cache.len(), 2);
        for i in 0..FILTER_CACHE_CAPACITY {
            cache.get(&format!("event.type == '{i}'"));
        }
        assert!(cache.len() <= FILTER_CACHE_CAPACITY);
    }

    /// The README's examples (`<!-- filter-examples -->`), each `filter => result`, on the event it
    /// shows.
    #[test]
    fn the_readme_examples_hold() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let after = readme
            .split_once("<!-- filter-examples -->")
            .expect("the README marks its examples")
            .1;
        let block = after.split_once("```text\n").unwrap().1.split_once("\n```").unwrap().0;
        let input = EventInput::new(
            "database.backup.completed",
            &json!({"region": "eu-west-1", "size_bytes": 5_000_000_000i64, "tags": ["prod", "critical"],
                    "labels": {"team": "payments"},
                    "replicas": [{"zone": "a", "healthy": true}, {"zone": "b", "healthy": false}]}),
        );
        let mut checked = 0;
        for line in block.lines() {
            let (source, want) = line.rsplit_once("=>").expect("filter => result");
            let want: bool = want.trim().parse().unwrap();
            let got = Filter::compile(source.trim())
                .unwrap()
                .evaluate(&input)
                .unwrap_or(false);
            assert_eq!(got, want, "{line}");
            checked += 1;
        }
        assert!(checked >= 5);
    }

    #[test]
    fn filters_and_inputs_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Filter>();
        send_sync::<FilterCache>();
        send_sync::<EventInput>();
    }
}
